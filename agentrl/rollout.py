"""The asynchronous multi-turn agent loop.

Every trajectory is its own coroutine: generate until a tool-call closing tag, an answer or EOS;
parse; run the calls through the executor; append the observation; repeat. A trajectory waiting on
a slow tool never holds the others, and the engine batches whatever generation requests are
pending at any moment.

Assembly is token-faithful: the prompt is rendered with the chat template once; each assistant
turn appends exactly the token ids the engine sampled (loss mask 1, logprobs kept); each
observation is rendered (env tags such as ``<information>``, or a ``tool`` message through the chat
template), tokenised and appended with loss mask 0 (see :mod:`agentrl.assembly`). Model output is
decoded only to be parsed, never re-encoded. Template rendering, tokenisation and the reward run
off the event loop, on threads of the worker's own.

A vision-language model's images (the task's, and those its tools return) are rendered by its
processor into blocks of image tokens (mask 0) and kept with the trajectory
(``Trajectory.images``), and every request carries the pixel inputs of all images so far, so an
image a tool returned in one turn is part of the model's input in every later turn. A trajectory
whose next images would pass ``rollout.max_images`` or ``rollout.max_image_pixels`` ends there
(stop reason ``max_images``, status ``truncated``).

Budgets are hard: a turn's ``max_new_tokens`` is clamped to what is left of
``rollout.max_response_tokens`` and of the engine's context length (``max_model_len``), and an
observation is cut to what is left, keeping its wrappers; no trajectory ever exceeds either.

Failures stay inside their trajectory. Anything other than cancellation raised while one trajectory
runs ends that trajectory with a status of its own (``engine_error``, ``template_error``,
``tool_error``, ``reward_error``, ``infra_error``; see :data:`~agentrl.trajectory.FAILURE_STATUSES`)
and a short reason in ``metadata["error"]``; the other trajectories go on. Such trajectories never
enter the loss, and neither do their groups: see :meth:`RolloutWorker.run_group`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import statistics
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agentrl.assembly import TokenAssembler
from agentrl.config import RolloutConfig, ToolsConfig
from agentrl.engines.base import Engine, SamplingParams
from agentrl.envs.base import Env, Task
from agentrl.executor import ToolExecutor, ToolResult, truncate_observation
from agentrl.multimodal import processor_for, record_images, trajectory_image_inputs
from agentrl.parsing import ParseResult
from agentrl.partial import PartialRolloutManager
from agentrl.runs import RolloutBatch, TrajectoryRun, derive_seed
from agentrl.tool import InfraError, ToolContext
from agentrl.trajectory import FAILURE_STATUSES, STATUSES, ToolCallRecord, Trajectory


class TrajectoryFailure(Exception):
    """A failure that is not the policy's, raised inside one trajectory: it ends that trajectory
    with ``status`` (also its stop reason) and never reaches the others."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status, self.reason = status, reason


def short_reason(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:limit].rstrip(": ")


@contextlib.contextmanager
def failing_as(status: str):
    """Turn any exception raised inside the block (not cancellation, which is not an Exception,
    and not the InfraError the caller handles) into a :class:`TrajectoryFailure` with ``status``."""
    try:
        yield
    except (TrajectoryFailure, InfraError):
        raise
    except Exception as error:
        raise TrajectoryFailure(status, short_reason(error)) from error


def failed_groups(trajectories: list[Trajectory]) -> set[str]:
    """Groups with at least one trajectory that failed for a reason not the policy's."""
    return {t.group_id for t in trajectories if t.status in FAILURE_STATUSES}


def drop_failed_groups(trajectories: list[Trajectory]) -> int:
    """Leave every member of a group with a failed trajectory out of the loss (``metadata["dropped"]``);
    returns how many groups were dropped. See :meth:`RolloutWorker.run_group` for why."""
    failed = failed_groups(trajectories)
    for trajectory in trajectories:
        if trajectory.group_id in failed and not trajectory.metadata.get("dropped"):
            trajectory.metadata["dropped"] = "another sample of this group failed; its baseline would be biased"
    return len(failed)


class RolloutWorker:
    """Runs trajectories of one env with one engine and one executor.

    With ``rollout.partial.enabled`` :meth:`run_batch` runs through :attr:`partial` (APRIL): the
    step ends once the target number of groups is complete and the rest carry over.
    """

    def __init__(self, engine: Engine, tokenizer: Any, env: Env, executor: ToolExecutor,
                 rollout: RolloutConfig | None = None, tools: ToolsConfig | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.env = env
        self.executor = executor
        self.config = rollout or RolloutConfig()
        self.tools_config = tools or ToolsConfig()
        tags = dict(env.tags) if env.action_format == "xml" else None
        self.parser = executor.parser(env.action_format, tags, env.answer_tag)
        # With parallel tool calls the turn is not cut at the first call's closing tag: the model
        # writes all its calls and ends the turn itself (EOS), as hermes/Qwen models are trained to.
        self.stop_strings = ([f"</{env.answer_tag}>"] if env.answer_tag else []) if self.config.parallel_tool_calls \
            else self.parser.stop_strings
        self.partial = PartialRolloutManager(self, self.config.partial)
        self.processor = processor_for(tokenizer)  # a vision-language model's, else None
        self.assembler = TokenAssembler(tokenizer, env, self.processor)
        names = [*self.parser.tags, "tool_call", "think"] + ([env.answer_tag] if env.answer_tag else [])
        self._action_tags = tuple(f"<{n}>" for n in names) + tuple(f"</{n}>" for n in names)
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        # One thread for the tokenizer (its calls are serialised, never on the loop) and a small
        # bounded pool for rewards; neither is the default pool that engines and tools use.
        self._text_pool = ThreadPoolExecutor(1, thread_name_prefix="agentrl-text")
        self._reward_pool = ThreadPoolExecutor(self.config.reward_workers, thread_name_prefix="agentrl-reward")

    # -- public API ------------------------------------------------------------------------

    async def run_batch(self, tasks: list[Task], seed: int = 0, group_size: int | None = None,
                        target_groups: int | None = None, partial: bool | None = None) -> RolloutBatch:
        """``group_size`` samples of every task, all concurrently (bounded by the config).

        Partial mode (``partial``, default ``rollout.partial.enabled``): carried-over groups and
        ``tasks`` run together and the step ends once ``target_groups`` (default ``len(tasks)``)
        groups are complete; evaluation passes ``partial=False``. Groups with a failed trajectory
        are dropped there without a retry.
        """
        n = group_size or self.config.group_size
        if self.config.partial.enabled if partial is None else partial:
            batch = await self.partial.run_step(tasks, seed, n, target_groups)
            drop_failed_groups(batch.trajectories)
            batch.metrics.update(rollout_metrics(batch.trajectories))
            return batch
        groups = await asyncio.gather(*(self.run_group(task, n, seed, index) for index, task in enumerate(tasks)))
        trajectories = [t for group in groups for t in group]
        return RolloutBatch(trajectories, rollout_metrics(trajectories))

    async def run_group(self, task: Task, n: int, seed: int = 0, task_index: int = 0) -> list[Trajectory]:
        """``n`` samples of ``task``. The group policy for failures that are not the policy's:

        A group with a failed trajectory is run again, all of it, with fresh tool sessions and new
        seeds, up to ``rollout.group_retries`` times; if it still has a failure, every member is
        left out of the loss (``metadata["dropped"]``). Neither keeping the survivors nor retrying
        only the failed sample is unbiased: such failures correlate with what the policy did (a
        context-length error hits long trajectories, a reward timeout pathological output), so a
        group baseline from the rest would be computed over a filtered sample.
        """
        for attempt in range(self.config.group_retries + 1):
            group = list(await asyncio.gather(*(
                self.run_trajectory(task, i, derive_seed(seed, task_index, i + attempt * n)) for i in range(n)
            )))
            for trajectory in group:
                trajectory.metadata["attempt"] = attempt
            if not failed_groups(group):
                return group
        drop_failed_groups(group)
        return group

    async def run_trajectory(self, task: Task, sample: int = 0, seed: int = 0) -> Trajectory:
        run = self.new_run(task, sample, seed)
        await self.advance(run)
        return run.trajectory

    def new_run(self, task: Task, sample: int, seed: int) -> TrajectoryRun:
        """A run whose prompt is rendered when it first advances (off the loop, failures contained)."""
        trajectory = Trajectory(id=f"{task.id}/{sample}", group_id=str(task.id), prompt_ids=[],
                                policy_version=self.engine.policy_version)
        return TrajectoryRun(task, trajectory, seed)

    async def advance(self, run: TrajectoryRun) -> None:
        """Run (or continue) a trajectory to its end, then score it. Only cancellation propagates."""
        trajectory = run.trajectory
        async with self._semaphore():
            try:
                if not trajectory.prompt_ids:
                    with failing_as("template_error"):
                        if self.processor is not None and run.task.images:
                            trajectory.prompt_ids, pieces = await self._off_loop(self.render_prompt_with_images, run.task)
                            self._add_images(trajectory, pieces, -1)
                        else:
                            trajectory.prompt_ids = await self._off_loop(self.render_prompt, run.task)
                with failing_as("tool_error"):
                    images = await self._tool_images(run)
                context = ToolContext(trajectory.id, dict(run.task.metadata), images)
                async with self.executor.session(trajectory.id, context) as session:
                    await self._loop(run, session)
            except TrajectoryFailure as failure:
                self._fail(trajectory, failure.status, failure.reason)
            except InfraError as error:
                self._fail(trajectory, "infra_error", short_reason(error))
            except Exception as error:  # the tool session itself (its setup or close) failed
                self._fail(trajectory, "tool_error", short_reason(error))
            await self._score(run)
            with contextlib.suppress(Exception):  # the viewer's span texts; finish() retries on failure
                trajectory.metadata["span_text"] = await self._off_loop(
                    self.assembler.decode_spans, list(trajectory.response_ids), list(trajectory.turns))
        self.finish(run)

    def finish(self, run: TrajectoryRun) -> None:
        trajectory = run.trajectory
        if len(trajectory.metadata.get("span_text", ())) != len(trajectory.turns):
            with contextlib.suppress(Exception):  # a tokenizer that cannot decode must not fail the batch
                trajectory.metadata["span_text"] = self.assembler.decode_spans(trajectory.response_ids, trajectory.turns)
        run.done = True

    def render_prompt(self, task: Task) -> list[int]:
        tools = self.executor.schemas if self.env.action_format == "json" else None
        return self.assembler.render_prompt(task.messages, tools)

    def render_prompt_with_images(self, task: Task):
        tools = self.executor.schemas if self.env.action_format == "json" else None
        return self.assembler.render_prompt_with_images(task.messages, tools, list(task.images))

    async def _tool_images(self, run: TrajectoryRun) -> list[Any]:
        """The images a trajectory's tools work on: the task's, and for a vision-language trajectory
        that continues (a partial rollout carried into another step, maybe through a checkpoint)
        every image it has shown the model since, so an image index means what it meant before."""
        if not any(record.turn >= 0 for record in run.trajectory.images):
            return list(run.task.images)
        inputs = await self._off_loop(trajectory_image_inputs, run.trajectory, self.processor)
        return list(inputs.images)

    def _over_image_budget(self, trajectory: Trajectory, images: list[Any]) -> bool:
        """Whether adding ``images`` would pass ``rollout.max_images`` or ``rollout.max_image_pixels``."""
        count = len(trajectory.images) + len(images)
        pixels = sum(r.width * r.height for r in trajectory.images) + sum(i.width * i.height for i in images)
        return count > self.config.max_images or pixels > self.config.max_image_pixels

    def _add_images(self, trajectory: Trajectory, pieces: list[Any], turn: int) -> None:
        """Keep the images of the image pieces just appended (their blocks are in the ids now); a
        prompt's images over the budget end the trajectory before its first turn."""
        images = [p.image for p in pieces if p.image is not None]
        if turn < 0 and self._over_image_budget(trajectory, images):
            trajectory.stop_reason, trajectory.status = "max_images", "truncated"
        record_images(trajectory, images, [p.tensors for p in pieces if p.image is not None], turn)

    async def _generate(self, trajectory: Trajectory, params: SamplingParams):
        """One request for the trajectory so far, with the pixel inputs of all its images."""
        if not trajectory.images:
            return await self.engine.generate(trajectory.input_ids, params)
        if "images" not in inspect.signature(self.engine.generate).parameters:
            raise ValueError(f"{type(self.engine).__name__} takes no images; this trajectory has "
                             f"{len(trajectory.images)} (use the hf engine for a vision-language model)")
        images = await self._off_loop(trajectory_image_inputs, trajectory, self.processor)
        return await self.engine.generate(trajectory.input_ids, params, images=images)

    def state_dict(self) -> dict[str, Any]:
        """The partial-rollout state a trainer checkpoint holds."""
        return self.partial.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.partial.load_state_dict(state)

    @property
    def max_model_len(self) -> int | None:
        """The engine's context length (prompt + response), if it has one."""
        return self.config.max_model_len or getattr(self.engine, "max_model_len", None)

    # -- scoring ---------------------------------------------------------------------------

    async def _score(self, run: TrajectoryRun) -> None:
        """The env's reward, on the reward pool, within ``rollout.reward_timeout_s``."""
        trajectory = run.trajectory
        if trajectory.stop_reason == "stale" or trajectory.status in FAILURE_STATUSES:
            return
        timeout = self.config.reward_timeout_s
        try:
            if inspect.iscoroutinefunction(self.env.reward):
                reward = await asyncio.wait_for(self.env.reward(run.task, trajectory), timeout)
            else:
                call = functools.partial(self.env.reward, run.task, trajectory)
                reward = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._reward_pool, call), timeout)
            score = float(reward.score)
        except asyncio.TimeoutError:
            self._fail(trajectory, "reward_error", f"the reward function ran past rollout.reward_timeout_s={timeout:g} s")
            return
        except Exception as error:
            self._fail(trajectory, "reward_error", short_reason(error))
            return
        trajectory.reward = score
        trajectory.turn_rewards = reward.turn_rewards
        trajectory.metrics.update({"success": float(reward.success), **reward.info})

    def _fail(self, trajectory: Trajectory, status: str, reason: str) -> None:
        trajectory.status = trajectory.stop_reason = status
        trajectory.metadata["error"] = reason
        if status == "infra_error":
            trajectory.metadata["infra_error"] = reason

    async def _off_loop(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._text_pool, functools.partial(function, *args))

    # -- the loop --------------------------------------------------------------------------

    def _budget(self, trajectory: Trajectory) -> tuple[int, int | None]:
        """Tokens left of the response budget and of the context (``None``: no context length)."""
        remaining = self.config.max_response_tokens - len(trajectory.response_ids)
        limit = self.max_model_len
        return remaining, (limit - len(trajectory.prompt_ids) - len(trajectory.response_ids) if limit else None)

    async def _loop(self, run: TrajectoryRun, session) -> None:
        config, trajectory = self.config, run.trajectory
        # A run that already ended and was cancelled while its tool session closed (partial
        # rollouts end a step at any await) must not generate again when it continues.
        if trajectory.stop_reason is not None:
            return
        while True:
            if run.tools_pending:
                if not await self._tools(run, session):
                    return
                continue
            turn = run.turn
            if turn >= config.max_turns:
                trajectory.stop_reason = "max_turns"
                return
            remaining, context = self._budget(trajectory)
            if context is not None and context <= 0:
                trajectory.stop_reason, trajectory.status = "max_context", "truncated"
                return
            if remaining <= 0:
                trajectory.stop_reason, trajectory.status = "max_response_tokens", "truncated"
                return
            limit = min(config.max_new_tokens, remaining, context if context is not None else remaining)
            params = SamplingParams(
                max_new_tokens=limit, temperature=config.temperature,
                top_p=config.top_p, stop=self.stop_strings, seed=(run.seed * 100 + turn) % 2**31,
            )
            try:
                with failing_as("engine_error"):
                    result = await self._generate(trajectory, params)
                    if len(result.token_ids) > limit:
                        raise ValueError(f"the engine returned {len(result.token_ids)} tokens for max_new_tokens={limit}")
                    trajectory.append_model_tokens(result.token_ids, result.logprobs, turn, result.policy_version)
            except InfraError as error:  # the inference server is down: not the policy's fault
                self._fail(trajectory, "infra_error", short_reason(error))
                return
            if result.finish_reason == "abort":  # the server gave up mid-turn: continue the same turn
                if not result.token_ids:
                    self._fail(trajectory, "infra_error", "the engine aborted the request without a token")
                    return
                continue
            run.finish_reason = result.finish_reason
            parsed = await self._parse_turn(trajectory, turn)
            if result.finish_reason == "stop" and parsed.in_think:  # a closing tag while reasoning
                continue
            if parsed.answer is not None:
                trajectory.answer, trajectory.stop_reason = parsed.answer, "answer"
                return
            if result.finish_reason == "length":
                trajectory.status = "truncated"
                if limit < config.max_new_tokens and len(result.token_ids) >= limit:
                    trajectory.stop_reason = "max_context" if context is not None and context == limit < remaining \
                        else "max_response_tokens"
                else:
                    trajectory.stop_reason = "max_new_tokens"
                return
            if not parsed.calls and not parsed.errors:
                trajectory.stop_reason = "eos"
                return
            if parsed.errors and not parsed.calls and config.end_on_format_error:
                self._record(trajectory, turn, parsed, [])
                trajectory.status = trajectory.stop_reason = "format_error"
                return
            if turn == config.max_turns - 1:  # a call on the last turn is not run
                trajectory.stop_reason = "max_turns"
                return
            run.tools_pending = True

    async def _parse_turn(self, trajectory: Trajectory, turn: int) -> ParseResult:
        """Parse everything the model wrote in ``turn`` (one generation, or several after aborts)."""
        ids = [i for s in trajectory.turns if s.role == "assistant" and s.turn == turn
               for i in trajectory.response_ids[s.start:s.end]]
        with failing_as("template_error"):
            text = await self._off_loop(self.assembler.decode, ids, self._action_tags)
        return self.parser.parse(text)

    async def _tools(self, run: TrajectoryRun, session) -> bool:
        """Run the last turn's calls and append their observation; False when the episode ends."""
        trajectory, turn = run.trajectory, run.turn
        parsed = await self._parse_turn(trajectory, turn)
        with failing_as("tool_error"):
            results = await session.run(parsed.calls)
        if any(r.status == "infra_error" for r in results):
            self._record(trajectory, turn, parsed, results)
            run.tools_pending, run.turn = False, turn + 1
            self._fail(trajectory, "infra_error", next(r.error for r in results if r.status == "infra_error") or "")
            return False
        images = [list(r.observation.images) for r in results] if self.processor is not None else []
        if self._over_image_budget(trajectory, [i for group in images for i in group]):
            self._record(trajectory, turn, parsed, results)
            run.tools_pending, run.turn = False, turn + 1
            trajectory.stop_reason, trajectory.status = "max_images", "truncated"
            return False
        remaining, context = self._budget(trajectory)
        budget = min(remaining, context) if context is not None else remaining
        last_id = trajectory.response_ids[-1] if trajectory.response_ids else None
        with failing_as("template_error"):
            pieces = await self._off_loop(self._observation, parsed, results, run.finish_reason, last_id,
                                          turn + 1 == self.config.max_turns - 1, budget, images)
        # From here on nothing awaits: the run's state changes all at once.
        self._record(trajectory, turn, parsed, results)
        run.tools_pending, run.turn = False, turn + 1
        if parsed.errors and not parsed.calls:
            trajectory.status = "format_error"
        if pieces is None:  # not even the observation's wrappers fit in what is left
            trajectory.stop_reason = "max_context" if context is not None and context < remaining else "max_response_tokens"
            trajectory.status = "truncated"
            return False
        for piece in pieces:
            trajectory.append_observation_tokens(piece.ids, turn, role=piece.role)
        self._add_images(trajectory, pieces, turn)
        return True

    def _record(self, trajectory: Trajectory, turn: int, parsed: ParseResult, results: list[ToolResult]) -> None:
        for result in results:
            trajectory.tool_calls.append(ToolCallRecord(
                result.call.tool, result.call.arguments, turn, result.status, result.latency_s, result.error
            ))
        for error in parsed.errors:
            trajectory.tool_calls.append(ToolCallRecord("", {}, turn, "format_error", 0.0, error.message))

    def _observation(self, parsed: ParseResult, results: list[ToolResult], finish_reason: str,
                     last_id: int | None, final: bool, budget: int, images: list[list[Any]] | None = None):
        """(On the text thread.) The observation's pieces within ``budget`` tokens; ``images[i]``
        are result ``i``'s images (vision-language models)."""
        limit, side = self.tools_config.max_observation_tokens, self.tools_config.observation_truncation
        texts = [truncate_observation(r.observation.text, self.tokenizer, limit, side) for r in results]
        texts += [f"Error: {error.message}" for error in parsed.errors]
        return self.assembler.observation(texts, finish_reason, last_id, final, budget, images)

    def _semaphore(self) -> asyncio.Semaphore:
        key = id(asyncio.get_running_loop())
        if key not in self._semaphores:
            self._semaphores[key] = asyncio.Semaphore(self.config.max_concurrent_trajectories)
        return self._semaphores[key]


def rollout_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """Per-step metrics: turns, tool calls per tool, tool errors and latency, stop reasons, statuses."""
    if not trajectories:
        return {}
    metrics: dict[str, float] = {
        "trajectories": float(len(trajectories)),
        "turns_mean": statistics.fmean(t.num_turns for t in trajectories),
        "response_tokens_mean": statistics.fmean(len(t.response_ids) for t in trajectories),
        "generated_tokens": float(sum(t.num_model_tokens for t in trajectories)),  # sampled by the engine
    }
    scored = [t for t in trajectories if t.trainable and t.reward is not None]
    if scored:
        metrics["reward_mean"] = statistics.fmean(t.reward for t in scored)
        metrics["success_rate"] = statistics.fmean(t.metrics.get("success", 0.0) for t in scored)
    for reason, count in Counter(t.stop_reason for t in trajectories).items():
        metrics[f"stop/{reason}"] = count / len(trajectories)
    statuses = Counter(t.status for t in trajectories)
    for status in dict.fromkeys((*STATUSES, *statuses)):  # every status, so a failure shows as a rise from 0
        metrics[f"status/{status}"] = statuses[status] / len(trajectories)
    metrics["failures"] = float(sum(statuses[s] for s in FAILURE_STATUSES))
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for trajectory in trajectories:
        groups[trajectory.group_id].append(trajectory)
    metrics["groups/dropped"] = float(sum(any(t.metadata.get("dropped") for t in g) for g in groups.values()))
    metrics["groups/retried"] = float(sum(any(t.metadata.get("attempt", 0) > 0 for t in g) for g in groups.values()))
    calls = [c for t in trajectories for c in t.tool_calls]
    for tool, count in Counter(c.tool or "<format>" for c in calls).items():
        metrics[f"tool_calls/{tool}"] = count / len(trajectories)
    if calls:
        latencies = sorted(c.latency_s for c in calls if c.tool)
        metrics["tool_errors"] = sum(c.status != "ok" for c in calls) / len(calls)
        if latencies:
            metrics["tool_latency_mean_s"] = statistics.fmean(latencies)
            metrics["tool_latency_p95_s"] = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    return metrics
