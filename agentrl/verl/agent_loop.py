"""The ``agentrl`` agent loop: this project's rollout of one sample inside verl's agent-loop workers.

verl instantiates the loop once per sample (``hydra.utils.instantiate`` with the trainer config,
its ``LLMServerClient``, the tokenizer, ...) inside a running event loop and awaits
``run(sampling_params, **row)``. The loop rebuilds the row's :class:`~agentrl.envs.base.Task` with
the env's own ``make_task`` (the parquet from :mod:`agentrl.verl.export` carries the env's row) and
runs :meth:`agentrl.rollout.RolloutWorker.run_trajectory` on it: the same parsing, tools with their
timeouts, budgets, token-exact assembly and reward as the local trainer. The env, the tool executor
(and its parsers) and the rollout worker are built once per worker process and run config
(:func:`worker_state`), not per sample.

The engine is :class:`ServerEngine`, agentrl's engine contract over ``server_manager.generate``:
token ids in, token ids and logprobs out, one request id per trajectory (sticky routing, so the
prefix cache serves every turn). verl's servers report ``completed`` for both an EOS and a stop
string, so :func:`finish_reason` infers which from the tokens.

The output is :class:`AgentrlLoopOutput`: the prompt, the response with its loss mask (1 on sampled
tokens, 0 on observations and template glue) and logprobs, the env's reward as ``reward_score``
and the env's per-turn rewards placed on each turn's last token of ``rm_scores`` (``as_dict``, the
v1 trainer's path; the legacy trainer keeps only ``reward_score``). A trajectory that failed for a
reason not the policy's (``infra_error``, ``engine_error``, ... see
:data:`agentrl.trajectory.FAILURE_STATUSES`) comes back with an all-zero mask and reward 0, so it
adds nothing to the loss.
"""

from __future__ import annotations

import contextvars
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput

from agentrl.config import RunConfig, load_config
from agentrl.engines.base import GenerationResult, SamplingParams
from agentrl.envs.base import Env, Task
from agentrl.executor import ToolExecutor
from agentrl.multimodal import (
    ImageInputs,
    attach_processor,
    is_vision_model_dir,
    processor_for,
    trajectory_image_inputs,
)
from agentrl.rollout import RolloutWorker, short_reason
from agentrl.tool import InfraError
from agentrl.trajectory import FAILURE_STATUSES, Trajectory
from agentrl.verl.algorithms import TURN_LEVEL_ESTIMATORS, turn_fields

CONFIG_ENV = "AGENTRL_CONFIG"  # the run config's path, when the verl config has no agentrl.config


# -- the engine over verl's LLM servers ----------------------------------------------------------


@dataclass
class Request:
    """One trajectory's side of the server: its request id, verl's sampling params, and what the
    server reported over its turns."""

    request_id: str
    sampling_params: dict[str, Any]
    generate_s: float = 0.0
    num_preempted: int = 0
    min_global_steps: int | None = None
    max_global_steps: int | None = None


_request: contextvars.ContextVar[Request] = contextvars.ContextVar("agentrl_verl_request")


def finish_reason(stop_reason: str | None, token_ids: list[int], stop: list[str], max_tokens: int,
                  eos_ids: set[int], decode) -> tuple[str, str | None]:
    """agentrl's ``(finish_reason, stop_text)`` from a verl ``TokenOutput``.

    ``aborted`` is ``abort``. ``completed`` (or unknown) is ``eos`` when the last token is an EOS
    id; ``stop`` when one of ``stop`` appears in the decoded tokens and did not before the last
    token (the server stops at the token completing it); ``length`` when ``max_tokens`` were
    sampled; ``eos`` otherwise (the server stopped on another stop token).
    """
    if stop_reason in ("aborted", "abort"):
        return "abort", None
    if stop_reason == "length":
        return "length", None
    if token_ids and token_ids[-1] in eos_ids:
        return "eos", None
    if stop and token_ids:
        text, before = decode(token_ids), decode(token_ids[:-1])
        for candidate in stop:
            if candidate in text and candidate not in before:
                return "stop", candidate
    if len(token_ids) >= max_tokens:
        return "length", None
    return "eos", None


def _infrastructure_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from ray import exceptions

        errors += [exceptions.RayActorError, exceptions.ActorUnavailableError, exceptions.GetTimeoutError]
    except ImportError:
        pass
    return tuple(errors)


class ServerEngine:
    """agentrl's :class:`~agentrl.engines.base.Engine` over verl's ``LLMServerClient``.

    The trajectory's :class:`Request` (set by the agent loop in a context variable) supplies the
    request id and verl's sampling params (temperature, top-p, top-k; greedy ones for validation);
    each call adds ``max_tokens``, ``logprobs`` and the turn's stop strings, kept in the output
    (``include_stop_str_in_output`` for vLLM, ``no_stop_trim`` for SGLang). A server or actor that
    is gone raises :class:`~agentrl.tool.InfraError`; anything else it raises is the request's
    failure (``engine_error``).
    """

    def __init__(self, server_manager: Any, tokenizer: Any, max_model_len: int | None = None,
                 server: str = "vllm") -> None:
        self.server_manager = server_manager
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        # keep the stop string in the output: each server has its own name for it
        self.keep_stop = {"no_stop_trim": True} if server == "sglang" else {"include_stop_str_in_output": True}
        self.policy_version = 0
        ids = {tokenizer.eos_token_id}
        self.eos_ids = {int(i) for i in ids if i is not None}
        self._infrastructure = _infrastructure_errors()

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       images: ImageInputs | None = None) -> GenerationResult:
        """``images``: those whose blocks ``prompt_ids`` holds, sent as verl's ``image_data``."""
        request = _request.get()
        sampling = {**request.sampling_params, "max_tokens": params.max_new_tokens, "logprobs": True}
        if params.stop:
            sampling.update(stop=list(params.stop), **self.keep_stop)
        media = {"image_data": list(images.images)} if images else {}  # as verl's own tool agent loop sends them
        started = time.perf_counter()
        try:
            output = await self.server_manager.generate(request.request_id, prompt_ids=list(prompt_ids),
                                                        sampling_params=sampling, **media)
        except self._infrastructure as error:
            raise InfraError(f"verl's LLM server is unavailable: {short_reason(error)}") from error
        finally:
            request.generate_s += time.perf_counter() - started
        ids = [int(i) for i in output.token_ids]
        logprobs = [float(v) for v in output.log_probs] if output.log_probs is not None else [0.0] * len(ids)
        request.num_preempted += int(output.num_preempted or 0)
        steps = [output.extra_fields.get(key) for key in ("min_global_steps", "max_global_steps", "global_steps")]
        for step in (int(s) for s in steps if isinstance(s, int | float)):  # the weights' versions
            request.min_global_steps = step if request.min_global_steps is None else min(request.min_global_steps, step)
            request.max_global_steps = step if request.max_global_steps is None else max(request.max_global_steps, step)
            self.policy_version = max(self.policy_version, step)
        finish, stop_text = finish_reason(output.stop_reason, ids, params.stop, params.max_new_tokens, self.eos_ids,
                                          lambda tokens: self.tokenizer.decode(tokens, skip_special_tokens=False))
        return GenerationResult(ids, logprobs, finish, stop_text, self.policy_version)

    def update_weights(self, state_dict: dict | None = None) -> None:
        raise RuntimeError("verl syncs the servers' weights itself; this engine only samples from them")

    async def close(self) -> None:
        return None


# -- per-worker state ----------------------------------------------------------------------------


@dataclass
class WorkerState:
    """What a worker process builds once per run config: the env, its tools and the rollout worker."""

    config: RunConfig
    env: Env
    executor: ToolExecutor
    engine: ServerEngine
    worker: RolloutWorker


_states: dict[tuple[str, int, int], WorkerState] = {}
_states_lock = threading.Lock()


def config_path(trainer_config: Any) -> str:
    """The agentrl run config of this verl run: ``+agentrl.config=PATH`` in verl's config (what
    ``agentrl train trainer.backend=verl`` passes), else ``$AGENTRL_CONFIG``."""
    section = trainer_config.get("agentrl") if hasattr(trainer_config, "get") else None
    path = (section or {}).get("config") or os.environ.get(CONFIG_ENV)
    if not path:
        raise ValueError("the agentrl agent loop needs the run config: pass +agentrl.config=PATH to verl "
                         f"(agentrl train CONFIG trainer.backend=verl does) or set ${CONFIG_ENV}")
    return str(path)


def worker_state(path: str, server_manager: Any, tokenizer: Any, rollout_config: Any) -> WorkerState:
    """The state for ``path`` in this process (built on first use). ``rollout_config`` is verl's
    ``actor_rollout_ref.rollout``: the response budget is the smaller of agentrl's
    ``rollout.max_response_tokens`` and verl's ``response_length``, since verl cannot hold more."""
    from agentrl.envs import get_env_class

    key = (path, id(server_manager), id(tokenizer))
    with _states_lock:
        if key in _states:
            return _states[key]
        config = load_config(path)
        env = get_env_class(config.env.name)(**config.env.options)
        executor = ToolExecutor(config.tools.names or list(env.tools), config.tools.options,
                                config.tools.server_url, config.tools.server_token)
        response_length = int(rollout_config.get("response_length") or config.rollout.max_response_tokens)
        rollout = config.rollout.model_copy(update={
            "max_response_tokens": min(config.rollout.max_response_tokens, response_length)})
        max_model_len = config.rollout.max_model_len or rollout_config.get("max_model_len") or None
        engine = ServerEngine(server_manager, tokenizer, max_model_len, str(rollout_config.get("name") or "vllm"))
        worker = RolloutWorker(engine, tokenizer, env, executor, rollout, config.tools)
        _states[key] = WorkerState(config, env, executor, engine, worker)
        return _states[key]


# -- the output ----------------------------------------------------------------------------------


class AgentrlLoopOutput(AgentLoopOutput):
    """verl's output plus per-turn rewards: ``turn_rewards`` holds ``(position, reward)`` pairs in
    the response, which :meth:`as_dict` adds to ``rm_scores`` (where ``reward_score`` sits on the
    last model token), so ``sum(rm_scores)`` is the trajectory's whole reward; and each response
    token's turn and anchor state (``turn_fields``, :func:`agentrl.verl.algorithms.turn_fields`),
    which :meth:`as_dict` adds as tensors for ``agentrl_gigpo``."""

    turn_rewards: list[tuple[int, float]] = []
    turn_fields: dict[str, list[int]] = {}

    def as_dict(self) -> dict[str, Any]:
        output = super().as_dict()
        output.pop("turn_rewards", None)
        output.pop("turn_fields", None)
        for name, values in self.turn_fields.items():
            output[name] = torch.tensor(values, dtype=torch.int64)
        scores, mask = output.get("rm_scores"), output["response_mask"]
        if scores is not None and not mask[-1] and mask.any():
            # verl put the reward on the last token, an observation here: move it to the last model
            # token, where the local trainer has it (verl's REINFORCE++ and GAE skip masked tokens)
            last = int(mask.nonzero()[-1])
            scores[last], scores[-1] = scores[last] + scores[-1], 0.0
        if self.turn_rewards:
            scores = output.get("rm_scores")
            if scores is None:
                scores = torch.zeros_like(output["response_mask"], dtype=torch.float32)
            for position, reward in self.turn_rewards:
                scores[position] += reward
            output["rm_scores"] = scores
        return output


def turn_ends(trajectory: Trajectory) -> list[int]:
    """The response position of each assistant turn's last token, in turn order."""
    ends: dict[int, int] = {}
    for span in trajectory.turns:
        if span.role == "assistant":
            ends[span.turn] = max(ends.get(span.turn, -1), span.end - 1)
    return [ends[turn] for turn in sorted(ends)]


def loop_output(trajectory: Trajectory, request: Request, pad_id: int, prompt_length: int,
                response_length: int, tool_s: float, images: list[Any] | None = None,
                per_turn_rewards: bool = True) -> AgentrlLoopOutput:
    """verl's output for a finished trajectory (see the module docstring); ``images`` (every image
    the model saw, in the order of their blocks in the ids) become ``multi_modal_data["images"]``.
    ``per_turn_rewards=False`` leaves the env's per-turn rewards out of ``rm_scores``: the local
    trainer's sequence-level estimators read only the trajectory's reward."""
    if len(trajectory.prompt_ids) > prompt_length and trajectory.status not in FAILURE_STATUSES:
        trajectory.status = trajectory.stop_reason = "template_error"
        trajectory.metadata["error"] = (f"the prompt has {len(trajectory.prompt_ids)} tokens, more than verl's "
                                        f"data.max_prompt_length={prompt_length}")
    failed = trajectory.status in FAILURE_STATUSES
    prompt_ids = list(trajectory.prompt_ids)[-prompt_length:] or [pad_id]
    response_ids = list(trajectory.response_ids)[:response_length]
    mask = list(trajectory.loss_mask)[:response_length]
    logprobs = list(trajectory.logprobs)[:response_length]
    if not response_ids:  # verl puts the reward on the last response token: there must be one
        response_ids, mask, logprobs = [pad_id], [0], [0.0]
    if failed:
        mask = [0] * len(mask)
    turn_rewards = []
    if not failed and per_turn_rewards and trajectory.turn_rewards:
        turn_rewards = [(position, float(reward)) for position, reward in zip(turn_ends(trajectory), trajectory.turn_rewards)
                        if position < len(response_ids) and reward]
    reward = 0.0 if failed or trajectory.reward is None else float(trajectory.reward)
    chat_turns = {(s.role == "assistant", s.turn) for s in trajectory.turns if s.role != "template"}
    extra = {
        "turn_scores": [float(r) for r in trajectory.turn_rewards or []],
        "agentrl_status": trajectory.status, "agentrl_stop_reason": trajectory.stop_reason,
        "agentrl_error": trajectory.metadata.get("error"),
        "reward_extra_info": {"success": float(trajectory.metrics.get("success", 0.0))},
    }
    if request.min_global_steps is not None:
        extra.update(min_global_steps=request.min_global_steps, max_global_steps=request.max_global_steps)
    return AgentrlLoopOutput(
        prompt_ids=prompt_ids, response_ids=response_ids, response_mask=mask, response_logprobs=logprobs,
        reward_score=reward, num_turns=1 + len(chat_turns), turn_rewards=turn_rewards, extra_fields=extra,
        turn_fields=turn_fields(trajectory, 0 if failed else len(response_ids), len(response_ids)),
        **({"multi_modal_data": {"images": list(images)}} if images else {}),  # unset for text, as before
        metrics=AgentLoopMetrics(generate_sequences=request.generate_s, tool_calls=tool_s,
                                 num_preempted=request.num_preempted),
    )


# -- the loop ------------------------------------------------------------------------------------


def attach_vision_processor(tokenizer: Any, processor: Any, model_path: str | None) -> None:
    """Let agentrl's rollout see a vision-language model: it knows one by the processor attached to
    the tokenizer (:func:`agentrl.multimodal.processor_for`). That is verl's processor when verl built
    one, else the model folder's own; a vision-language model without one is an error, never a
    text-only rollout. (verl 0.9.1's ``hf_processor`` builds none for Idefics3/SmolVLM.)"""
    if processor_for(tokenizer) is not None:
        return
    if processor is not None and getattr(processor, "image_processor", None) is not None:
        attach_processor(tokenizer, processor)
        return
    if not model_path or not is_vision_model_dir(model_path):
        return
    from transformers import AutoProcessor

    try:
        attach_processor(tokenizer, AutoProcessor.from_pretrained(model_path))
    except Exception as error:
        raise ValueError(f"{model_path} is a vision-language model but its processor does not load here "
                         f"({short_reason(error)}); the agent loop cannot render its images") from error


class AgentrlAgentLoop(AgentLoopBase):
    """Registered as ``agentrl`` (``actor_rollout_ref.rollout.agent.default_agent_loop=agentrl``,
    or ``agent_name`` in the data). verl's ``tools`` (its own tool list) are not used: the run
    config names agentrl's tools."""

    def __init__(self, *args: Any, tools: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        attach_vision_processor(self.tokenizer, self.processor, self.config.actor_rollout_ref.model.get("path"))
        self.state = worker_state(config_path(self.config), self.server_manager, self.tokenizer, self.rollout_config)

    def task(self, row: dict[str, Any]) -> Task:
        """The env's task for a dataset row (its ``extra_info.agentrl_row``, written by the export)."""
        extra = row.get("extra_info") or {}
        if "agentrl_row" not in extra:
            raise ValueError("the row has no extra_info.agentrl_row; write the data with `agentrl export verl`")
        return self.state.env.make_task(json.loads(extra["agentrl_row"]), int(extra.get("index", row.get("index", 0))))

    async def run(self, sampling_params: dict[str, Any], **row: Any) -> AgentrlLoopOutput:
        task = self.task(row)
        request = Request(uuid.uuid4().hex, dict(sampling_params))
        task.id = f"{task.id}@{request.request_id[:12]}"  # unique tool sessions per run
        token = _request.set(request)
        try:
            trajectory = await self.state.worker.run_trajectory(task, int(row.get("session_id") or 0))
        finally:
            _request.reset(token)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        tool_s = sum(call.latency_s for call in trajectory.tool_calls)
        images = trajectory_image_inputs(trajectory).images if trajectory.images else None  # cached on it
        return loop_output(trajectory, request, int(pad_id), int(self.rollout_config.prompt_length),
                           int(self.rollout_config.response_length), tool_s, images,
                           per_turn_rewards=self.state.config.algo.advantage in TURN_LEVEL_ESTIMATORS)
