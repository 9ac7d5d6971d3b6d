"""The asynchronous multi-turn agent loop.

Every trajectory is its own coroutine: generate until a tool-call closing tag, an answer or EOS;
parse; run the calls through the executor; append the observation; repeat. A trajectory waiting on
a slow tool never holds the others, and the engine batches whatever generation requests are
pending at any moment.

Assembly is token-faithful: the prompt is rendered with the chat template once; each assistant
turn appends exactly the token ids the engine sampled (loss mask 1, logprobs kept); each
observation is rendered (env tags such as ``<information>``, or a ``tool`` message through the chat
template), tokenised and appended with loss mask 0. Model output is decoded only to be parsed,
never re-encoded.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agentrl.config import RolloutConfig, ToolsConfig
from agentrl.engines.base import Engine, SamplingParams
from agentrl.envs.base import Env, Task
from agentrl.executor import ToolExecutor, ToolResult, truncate_observation
from agentrl.parsing import ParseResult
from agentrl.tool import InfraError, ToolContext
from agentrl.trajectory import ToolCallRecord, Trajectory


@dataclass
class RolloutBatch:
    trajectories: list[Trajectory]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrajectoryRun:
    """One trajectory's resumable state. The loop only changes it at points where it is consistent
    (whole turns appended, tools not yet run or fully run), so a run cancelled at any ``await`` can
    continue later, in another step, with a newer policy."""

    task: Task
    trajectory: Trajectory
    seed: int
    turn: int = 0  # the next turn to generate
    tools_pending: bool = False  # the last assistant turn's tool calls have not run yet
    finish_reason: str = "stop"  # of the last generation (JSON format: decides the assistant end glue)
    done: bool = False

    @property
    def oldest_version(self) -> int | None:
        versions = [s.policy_version for s in self.trajectory.turns if s.role == "assistant" and s.policy_version is not None]
        return min(versions) if versions else None


def derive_seed(seed: int, task_index: int, sample: int) -> int:
    """A per-trajectory seed from the step seed, the task's position and the sample's index."""
    return ((seed * 1_000_003 + task_index) * 1_009 + sample) % 2**31


class RolloutWorker:
    """Runs trajectories of one env with one engine and one executor.

    With ``rollout.partial.enabled`` :meth:`run_batch` runs through :attr:`partial` (APRIL): the
    step ends once the target number of groups is complete and the rest carry over.
    """

    def __init__(self, engine: Engine, tokenizer: Any, env: Env, executor: ToolExecutor,
                 rollout: RolloutConfig | None = None, tools: ToolsConfig | None = None) -> None:
        from agentrl.partial import PartialRolloutManager

        self.engine = engine
        self.tokenizer = tokenizer
        self.env = env
        self.executor = executor
        self.config = rollout or RolloutConfig()
        self.tools_config = tools or ToolsConfig()
        tags = dict(env.tags) if env.action_format == "xml" else None
        self.parser = executor.parser(env.action_format, tags, env.answer_tag)
        self.partial = PartialRolloutManager(self, self.config.partial)
        self._semaphores: dict[int, asyncio.Semaphore] = {}

    # -- public API ------------------------------------------------------------------------

    async def run_batch(self, tasks: list[Task], seed: int = 0, group_size: int | None = None,
                        target_groups: int | None = None, partial: bool | None = None) -> RolloutBatch:
        """``group_size`` samples of every task, all concurrently (bounded by the config).

        Partial mode (``partial``, default ``rollout.partial.enabled``): carried-over groups and
        ``tasks`` run together and the step ends once ``target_groups`` (default ``len(tasks)``)
        groups are complete; evaluation passes ``partial=False``.
        """
        n = group_size or self.config.group_size
        if self.config.partial.enabled if partial is None else partial:
            return await self.partial.run_step(tasks, seed, n, target_groups)
        groups = await asyncio.gather(*(self.run_group(task, n, seed, index) for index, task in enumerate(tasks)))
        trajectories = [t for group in groups for t in group]
        return RolloutBatch(trajectories, rollout_metrics(trajectories))

    async def run_group(self, task: Task, n: int, seed: int = 0, task_index: int = 0) -> list[Trajectory]:
        return list(await asyncio.gather(*(self.run_trajectory(task, i, derive_seed(seed, task_index, i)) for i in range(n))))

    async def run_trajectory(self, task: Task, sample: int = 0, seed: int = 0) -> Trajectory:
        run = self.new_run(task, sample, seed)
        await self.advance(run)
        return run.trajectory

    def new_run(self, task: Task, sample: int, seed: int) -> TrajectoryRun:
        trajectory = Trajectory(id=f"{task.id}/{sample}", group_id=str(task.id), prompt_ids=self.render_prompt(task),
                                policy_version=self.engine.policy_version)
        return TrajectoryRun(task, trajectory, seed)

    async def advance(self, run: TrajectoryRun) -> None:
        """Run (or continue) a trajectory to its end, then score it."""
        async with self._semaphore():
            context = ToolContext(run.trajectory.id, dict(run.task.metadata), list(run.task.images))
            async with self.executor.session(run.trajectory.id, context) as session:
                await self._loop(run, session)
        self.finish(run)

    def finish(self, run: TrajectoryRun) -> None:
        trajectory = run.trajectory
        if trajectory.stop_reason != "stale":
            reward = self.env.reward(run.task, trajectory)
            trajectory.reward = reward.score
            trajectory.turn_rewards = reward.turn_rewards
            trajectory.metrics.update({"success": float(reward.success), **reward.info})
        trajectory.metadata["span_text"] = [
            self.tokenizer.decode(trajectory.response_ids[s.start:s.end]) for s in trajectory.turns
        ]
        run.done = True

    def render_prompt(self, task: Task) -> list[int]:
        tools = self.executor.schemas if self.env.action_format == "json" else None
        return list(self.tokenizer.apply_chat_template(
            task.messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
        ))

    def state_dict(self) -> dict[str, Any]:
        """The partial-rollout state a trainer checkpoint holds."""
        return self.partial.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.partial.load_state_dict(state)

    # -- the loop --------------------------------------------------------------------------

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
            remaining = config.max_response_tokens - len(trajectory.response_ids)
            if remaining <= 0:
                trajectory.stop_reason, trajectory.status = "max_response_tokens", "truncated"
                return
            params = SamplingParams(
                max_new_tokens=min(config.max_new_tokens, remaining), temperature=config.temperature,
                top_p=config.top_p, stop=self.parser.stop_strings, seed=(run.seed * 100 + turn) % 2**31,
            )
            try:
                result = await self.engine.generate(trajectory.input_ids, params)
            except InfraError as error:  # the inference server is down: not the policy's fault
                trajectory.status, trajectory.stop_reason = "infra_error", "infra_error"
                trajectory.metadata["infra_error"] = str(error)
                return
            trajectory.append_model_tokens(result.token_ids, result.logprobs, turn, result.policy_version)
            if result.finish_reason == "abort":  # the server gave up mid-turn: continue the same turn
                if not result.token_ids:
                    trajectory.status, trajectory.stop_reason = "infra_error", "infra_error"
                    return
                continue
            run.finish_reason = result.finish_reason
            parsed = self._parse_turn(trajectory, turn)
            if parsed.answer is not None:
                trajectory.answer, trajectory.stop_reason = parsed.answer, "answer"
                return
            if result.finish_reason == "length":
                spent = len(result.token_ids) >= remaining and remaining < config.max_new_tokens
                trajectory.stop_reason = "max_response_tokens" if spent else "max_new_tokens"
                trajectory.status = "truncated"
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

    def _parse_turn(self, trajectory: Trajectory, turn: int) -> ParseResult:
        """Parse everything the model wrote in ``turn`` (one generation, or several after aborts)."""
        ids = [i for s in trajectory.turns if s.role == "assistant" and s.turn == turn
               for i in trajectory.response_ids[s.start:s.end]]
        return self.parser.parse(self.tokenizer.decode(ids, skip_special_tokens=True))

    async def _tools(self, run: TrajectoryRun, session) -> bool:
        """Run the last turn's calls and append their observation; False when the episode ends."""
        trajectory, turn = run.trajectory, run.turn
        parsed = self._parse_turn(trajectory, turn)
        results = await session.run(parsed.calls)
        self._record(trajectory, turn, parsed, results)
        run.tools_pending, run.turn = False, turn + 1
        if any(r.status == "infra_error" for r in results):
            trajectory.status, trajectory.stop_reason = "infra_error", "infra_error"
            return False
        if parsed.errors and not parsed.calls:
            trajectory.status = "format_error"
        self._append_observation(trajectory, turn, run.finish_reason, parsed, results,
                                 final=turn + 1 == self.config.max_turns - 1)
        return True

    def _record(self, trajectory: Trajectory, turn: int, parsed: ParseResult, results: list[ToolResult]) -> None:
        for result in results:
            trajectory.tool_calls.append(ToolCallRecord(
                result.call.tool, result.call.arguments, turn, result.status, result.latency_s, result.error
            ))
        for error in parsed.errors:
            trajectory.tool_calls.append(ToolCallRecord("", {}, turn, "format_error", 0.0, error.message))

    def _observation_texts(self, parsed: ParseResult, results: list[ToolResult]) -> list[str]:
        budget, side = self.tools_config.max_observation_tokens, self.tools_config.observation_truncation
        texts = [truncate_observation(r.observation.text, self.tokenizer, budget, side) for r in results]
        return texts + [f"Error: {error.message}" for error in parsed.errors]

    def _append_observation(self, trajectory: Trajectory, turn: int, finish_reason: str, parsed: ParseResult,
                            results: list[ToolResult], final: bool) -> None:
        texts = self._observation_texts(parsed, results)
        if self.env.action_format == "xml":
            text = self.env.observation_template.format(observation="\n".join(texts))
            if final:
                text += self.env.final_turn_message
            trajectory.append_observation_tokens(self._encode(text), turn)
            return
        # JSON tool calls: close the assistant message, then the tool messages and the next prompt,
        # all rendered by the model's own chat template.
        if finish_reason != "eos":
            trajectory.append_observation_tokens(self._encode(self._assistant_end()), turn, role="template")
        messages = [{"role": "tool", "content": text} for text in texts]
        if final:
            messages.append({"role": "user", "content": self.env.final_turn_message})
        trajectory.append_observation_tokens(self._encode(self._render_suffix(messages)), turn)

    # -- chat-template pieces --------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _render_suffix(self, messages: list[dict[str, str]]) -> str:
        """The template's text for ``messages`` plus the next assistant prompt, as it would follow
        an earlier conversation (rendered after a fixed system message, which is then cut off)."""
        base = [{"role": "system", "content": "x"}]
        head = self.tokenizer.apply_chat_template(base, tokenize=False)
        full = self.tokenizer.apply_chat_template(base + messages, tokenize=False, add_generation_prompt=True)
        if not full.startswith(head):
            raise ValueError("the chat template does not render conversations incrementally")
        return full[len(head):]

    def _assistant_end(self) -> str:
        """What the template writes after an assistant message's content (e.g. ``<|im_end|>\\n``)."""
        base = [{"role": "system", "content": "x"}, {"role": "assistant", "content": "MARKER"}]
        rendered = self.tokenizer.apply_chat_template(base, tokenize=False)
        return rendered[rendered.rindex("MARKER") + len("MARKER"):]

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
    }
    scored = [t for t in trajectories if t.trainable and t.reward is not None]
    if scored:
        metrics["reward_mean"] = statistics.fmean(t.reward for t in scored)
        metrics["success_rate"] = statistics.fmean(t.metrics.get("success", 0.0) for t in scored)
    for reason, count in Counter(t.stop_reason for t in trajectories).items():
        metrics[f"stop/{reason}"] = count / len(trajectories)
    for status, count in Counter(t.status for t in trajectories).items():
        metrics[f"status/{status}"] = count / len(trajectories)
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
