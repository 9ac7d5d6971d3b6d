"""``trainer.device``: the policy, its KL reference, the value head or ArCHer critic, the optimizer
state and every batch follow it, and a device string is resolved and checked before anything loads.

There is no GPU here, so the failure a GPU run would meet (a tensor made on the CPU while the model
sits on the device) is made visible on the CPU. While a real step runs, every tensor agentrl's code
makes without naming a device, or puts on the CPU with ``.cpu()``, is marked :class:`OnTheCPU`: it
stands where a CPU tensor would stand on a GPU run, while the model and everything placed on
``trainer.device`` (here ``cpu``) stand for the device. An operation that mixes the two the way
CUDA refuses, and any such tensor reaching a model's forward pass, is a violation; moving a tensor
with ``.to(device)`` clears the mark, as the move would on a GPU.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import agentrl
from agentrl.config import ConfigError, build_config
from agentrl.trainer.batching import collate, forward_response, model_device
from agentrl.trainer.local import build_run, close_run, resolve_device, train, train_step
from agentrl.trainer.sft import sft_warm_start
from agentrl.trainer.update import LossBatch, update
from tests.helpers.ping_env import write_demonstrations

AGENTRL = str(Path(agentrl.__file__).resolve().parent) + "/"
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye}
# CUDA lets these take tensors of another device: indices into a tensor, a copy, a move
CROSS_DEVICE = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_, torch.Tensor.to,
                torch.Tensor.cpu, torch.Tensor.__repr__, torch.Tensor.__format__}


def agentrl_location() -> str:
    frame = sys._getframe(1)
    while frame is not None and not frame.f_code.co_filename.startswith(AGENTRL):
        frame = frame.f_back
    return "outside agentrl" if frame is None else f"{frame.f_code.co_filename[len(AGENTRL):]}:{frame.f_lineno}"


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def moves_to_a_device(func, args, kwargs) -> bool:
    if func is torch.Tensor.to:
        return "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])
    return func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None


class OnTheCPU(torch.Tensor):
    """A tensor where a CPU tensor would be on a GPU run (see the module docstring)."""

    violations: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if moves_to_a_device(func, args, kwargs):
                return func(*args, **kwargs).as_subclass(torch.Tensor)
            if func is torch.Tensor.__getitem__ and type(args[0]) is not cls:  # CPU indices into a device tensor
                return func(*args, **kwargs)
            if func not in CROSS_DEVICE:
                tensors = list(tensors_in([args, kwargs]))
                # CUDA's rule: one device per operation, except CPU scalars (0-dim) among device tensors
                if any(type(t) is not cls for t in tensors) and any(type(t) is cls and t.dim() > 0 for t in tensors):
                    cls.violations.append(f"{getattr(func, '__name__', func)} mixes CPU and device tensors at "
                                          f"{agentrl_location()}")
        return super().__torch_function__(func, types, args, kwargs)


class DeviceCheck(TorchFunctionMode):
    """Marks what agentrl's code puts on the CPU (a factory without ``device=``, ``.cpu()``) and
    records the tensors reaching the given modules' forward passes."""

    def __init__(self):
        super().__init__()
        self.handles, self.forward_inputs = [], 0
        OnTheCPU.violations = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if sys._getframe(1).f_code.co_filename.startswith(AGENTRL) and (
                (func in FACTORIES and kwargs.get("device") is None) or func is torch.Tensor.cpu):
            result = result.as_subclass(OnTheCPU)
        return result

    def watch(self, *modules) -> None:
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._inputs, with_kwargs=True))

    def _inputs(self, module, args, kwargs):
        device = next(module.parameters()).device
        for tensor in tensors_in([args, kwargs]):
            self.forward_inputs += 1
            if isinstance(tensor, OnTheCPU) or tensor.device != device:
                where = "the CPU" if isinstance(tensor, OnTheCPU) else tensor.device
                OnTheCPU.violations.append(f"a {tuple(tensor.shape)} tensor on {where} reached "
                                           f"{type(module).__name__}.forward on {device}")

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return super().__exit__(*exc)

    @property
    def violations(self) -> list[str]:
        return OnTheCPU.violations


def base_config(tmp_path, model_dir, **sections) -> dict:
    data = {
        "output_dir": str(tmp_path / "run"), "model": {"name": str(model_dir)},
        "env": {"name": "tests.helpers.ping_env:PingEnv", "eval_size": 2},
        "rollout": {"group_size": 3, "max_turns": 2, "max_new_tokens": 6, "max_response_tokens": 24},
        "trainer": {"steps": 1, "prompts_per_step": 2, "minibatch_size": 3, "micro_batch_size": 2, "lr": 1e-3,
                    "torch_threads": 1, "device": "cpu", "eval_before": False},
        "tracking": {"progress": False, "plot": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def varied_rewards(run) -> None:
    """Rewards that vary within (almost) every group, so every step has advantages to train on."""
    reward = run.env.reward
    run.env.reward = lambda task, trajectory: reward(task, trajectory).__class__((sum(trajectory.response_ids) % 7) / 7)


def placed_tensors(run):
    """(name, tensor) of everything the run keeps on ``trainer.device``."""
    modules = {"policy": run.model, "reference": run.reference, "value_head": run.value_head}
    if run.critic is not None:
        modules.update({"critic": run.critic.critic, "critic_target": run.critic.target})
    for name, module in modules.items():
        if module is not None:
            yield from ((f"{name}.{key}", tensor) for key, tensor in [*module.named_parameters(), *module.named_buffers()])
    optimizers = {"optimizer": run.optimizer, "critic_optimizer": run.critic.optimizer if run.critic else None}
    for name, optimizer in optimizers.items():
        for index, state in enumerate(optimizer.state.values() if optimizer is not None else []):
            # torch keeps Adam's step counter on the CPU by design (it is read on the host)
            yield from ((f"{name}[{index}].{key}", value) for key, value in state.items() if key != "step")


def test_auto_is_cuda_where_torch_finds_it_else_the_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_config_error_naming_trainer_device(device, tmp_path, tiny_model_dir):
    config = build_config(base_config(tmp_path, tiny_model_dir, trainer={"device": device}))
    with pytest.raises(ConfigError, match=rf"trainer\.device={device}: torch finds no CUDA device.*trainer\.device=cpu"):
        build_run(config)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x", "CPU", "meta"])
def test_an_unknown_device_is_a_config_error(device):
    with pytest.raises(ConfigError, match=r"trainer\.device"):
        build_config({}, [f"trainer.device={device}"])


def test_the_check_catches_a_batch_left_where_it_was_collated(tmp_path, tiny_model_dir):
    """The instrument itself: a batch collated on the CPU and given to the model unmoved, and a
    tensor made from it without a device, are both reported."""
    run = build_run(build_config(base_config(tmp_path, tiny_model_dir)))
    try:
        trajectories, _ = run.recipe.collect(1)
        with DeviceCheck() as check:
            check.watch(run.model)
            batch = collate(trajectories, run.tokenizer.pad_token_id)
            device_batch = batch.to(model_device(run.model))
            forward_response(run.model, device_batch)
            assert check.violations == []
            forward_response(run.model, batch)  # not moved
            assert any("reached LlamaForCausalLM.forward" in v for v in check.violations)
            check.violations.clear()
            device_batch.loss_mask * batch.loss_mask
            assert check.violations and "mixes CPU and device tensors" in check.violations[0]
    finally:
        close_run(run)


CASES = {
    # a KL reference copy, several minibatches (the scoring pass), Clip-Cov, bf16 autocast; then a
    # SPEAR replay batch made from what the update handed back
    "reference_bf16_clip_cov_replay": {"algo": {"kl_coef": 0.1, "clip_cov_ratio": 0.2, "clip_cov_lower": -10.0,
                                                "clip_cov_upper": 10.0}, "trainer": {"precision": "bf16"}},
    "gae_value_head": {"algo": {"advantage": "gae"}},
    "archer_critic": {"algo": {"advantage": "archer", "archer": {"warmup_steps": 0, "updates_per_step": 2,
                                                                 "hidden_size": 16}}},
    "gigpo_kl_in_reward": {"algo": {"advantage": "gigpo", "kl_coef": 0.1, "kl_in_reward": True}},
    "lora_reference_is_the_base": {"model": {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}},
                                   "algo": {"kl_coef": 0.1}},
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_step_keeps_every_tensor_on_the_configured_device(name, tmp_path, tiny_model_dir):
    configured = torch.device("cpu")
    with DeviceCheck() as check:
        run = build_run(build_config(base_config(tmp_path, tiny_model_dir, **CASES[name])))
    assert check.violations == []
    try:
        varied_rewards(run)
        heads = [*run.critic.critic.q, *run.critic.critic.v, *run.critic.target.q, *run.critic.target.v] \
            if run.critic is not None else []
        with DeviceCheck() as check:
            check.watch(*(m for m in (run.model, run.reference, run.value_head, *heads) if m is not None))
            try:
                metrics, trajectories = train_step(run)
                if name.endswith("replay"):
                    policy = collate(trajectories, run.tokenizer.pad_token_id, run.engine.policy_version)
                    moved = policy.to(model_device(run.model))
                    with torch.no_grad():
                        old = forward_response(run.model, moved).logprobs * moved.loss_mask
                    # stored on the CPU, as SPEAR's replay buffer keeps them
                    replay = LossBatch(policy, trajectories, name="sil", kind="replay",
                                       advantages=torch.ones(policy.size).as_subclass(OnTheCPU),
                                       old_logprobs=old.cpu().as_subclass(OnTheCPU))
                    metrics.update(update(run, [replay], step=1))
            except RuntimeError as error:  # a mix CUDA refuses may also fail outright on the CPU
                raise AssertionError(f"{error}\nviolations so far: {check.violations}") from error
        assert check.violations == []
        assert check.forward_inputs > 0 and "update/skipped" not in metrics and metrics["grad_norm"] > 0
        assert model_device(run.model) == configured
        placed = list(placed_tensors(run))
        assert any(key.startswith("optimizer") for key, _ in placed)  # the step made the optimizer state
        assert [(key, t.device) for key, t in placed if t.device != configured or isinstance(t, OnTheCPU)] == []
        if name == "gae_value_head":
            assert "loss/value" in metrics
        if name == "archer_critic":
            assert run.critic.updates == 2 and any(key.startswith("critic_optimizer") for key, _ in placed)
    finally:
        close_run(run)


def test_the_sft_warm_start_runs_on_the_configured_device(tmp_path, tiny_model_dir):
    demonstrations = write_demonstrations(tmp_path / "demos.jsonl", count=6)
    config = build_config(base_config(tmp_path, tiny_model_dir, trainer={"precision": "bf16"},
                                      sft={"enabled": True, "data": str(demonstrations), "epochs": 1,
                                           "batch_size": 4}))
    run = build_run(config)
    try:
        with DeviceCheck() as check:
            check.watch(run.model)
            metrics = sft_warm_start(run)
        assert check.violations == [] and check.forward_inputs > 0
        assert metrics["sft/updates"] == 2
    finally:
        close_run(run)


def as_if_written_on_a_gpu(path: Path) -> None:
    """Rewrite a ``torch.save`` file so that its tensors say they were saved from ``cuda:0``, as a
    checkpoint written by a GPU run does (the location is a string in the pickle)."""
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    pickle_name = next(name for name in entries if name.endswith("data.pkl"))
    assert b"X\x03\x00\x00\x00cpu" in entries[pickle_name]
    entries[pickle_name] = entries[pickle_name].replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tmp_path, tiny_model_dir):
    data = base_config(tmp_path, tiny_model_dir, algo={"advantage": "gae"})
    train(build_config(data))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001" / "training.pt"
    as_if_written_on_a_gpu(checkpoint)
    with pytest.raises(RuntimeError, match="CUDA"):  # what a load without map_location does here
        torch.load(checkpoint, weights_only=True)
    data["trainer"]["steps"] = 2
    state = train(build_config({**data, "resume": True}))
    assert state.step == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_eval_loads_the_policy_where_trainer_device_says_with_its_threads(tmp_path, tiny_model_dir):
    from agentrl.evaluate import build_engine

    with pytest.raises(ConfigError, match=r"trainer\.device=cuda: torch finds no CUDA device"):
        build_engine(build_config(base_config(tmp_path, tiny_model_dir, trainer={"device": "cuda"})))
    threads = torch.get_num_threads()
    try:
        config = build_config(base_config(tmp_path, tiny_model_dir, trainer={"device": "cpu", "torch_threads": 1}))
        engine, _ = build_engine(config)
        assert model_device(engine.model) == torch.device("cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
