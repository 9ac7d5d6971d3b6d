"""Rollout wall time: the asynchronous per-trajectory loop vs a turn-synchronous batched loop (every
trajectory waits for the whole batch at each turn, as Search-R1 and early VerlTool do), same model,
prompts, seeds and tool latencies, in one run.

Generation is real (the embedded SmolLM2-135M through the batched HF engine, a fixed number of
sampled tokens per turn); the actions are scripted so that both loops make exactly the same tool
calls: ``--turns`` tool turns (3 by default), then an answer. Each call's latency is drawn once from a log-normal
distribution clipped to 50-500 ms, so both loops wait for identical tools.

    .venv/bin/python bench/rollout.py [--trajectories 32] [--turns 3] [--tokens 16] [--spread 0.8]
                                      [--model smollm2-135m-instruct|tiny]

``--model tiny`` uses a randomly initialised 2-layer model of the same architecture: generation
then costs about what it costs on a GPU relative to tool latency, the regime agentic RL runs in.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.envs.base import Env, Reward, Task  # noqa: E402

from agentrl.config import PartialRolloutConfig, RolloutConfig, ToolsConfig  # noqa: E402
from agentrl.engines.base import GenerationResult, SamplingParams  # noqa: E402
from agentrl.engines.hf import HFEngine  # noqa: E402
from agentrl.executor import ToolExecutor  # noqa: E402
from agentrl.models import load_model, load_tokenizer, tiny_model  # noqa: E402
from agentrl.rollout import RolloutWorker  # noqa: E402
from agentrl.tool import Tool  # noqa: E402


class Wait(Tool):
    """Wait for the given number of milliseconds (a tool with a known latency)."""

    async def call(self, ms: int) -> str:
        await asyncio.sleep(ms / 1000)
        return f"waited {ms} ms"


class WaitEnv(Env):
    name, tools, tags = "wait", ("bench.rollout:Wait",), {"wait": "wait"}

    def make_task(self, row, index):
        return Task(id=row["id"], messages=[{"role": "user", "content": f"Task {row['id']}: do three steps."}],
                    metadata={"latencies": row["latencies"]})

    def reward(self, task, trajectory):
        return Reward(float(trajectory.answer == "done"))


def latency(rng: random.Random) -> int:
    """Milliseconds: log-normal around 150 ms, clipped to 50-500 ms."""
    return int(min(500, max(50, rng.lognormvariate(math.log(150), 0.6))))


def latencies(count: int, turns: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[latency(rng) for _ in range(turns)] for _ in range(count)]


def long_tail_plans(count: int, seed: int) -> list[list[int]]:
    """Plans whose number of tool turns has a long tail (1 to 8), as agent trajectories do."""
    rng = random.Random(seed)
    turns = rng.choices([1, 2, 3, 4, 6, 8], weights=[30, 25, 20, 12, 8, 5], k=count)
    return [[latency(rng) for _ in range(k)] for k in turns]


async def partial_vs_full(engine: HFEngine, tokenizer, tokens: int, spread: float, steps: int, target: int,
                          group_size: int, seed: int) -> dict[str, tuple[int, float]]:
    """Completed trajectories and wall time over ``steps`` steps of ``target`` groups: waiting for
    every group (the longest trajectory ends the step) vs partial rollouts (the step ends at the
    target; the rest carry over). Both draw tasks from the same long-tail stream."""
    plans = long_tail_plans(steps * target * 3, seed)
    env = WaitEnv()
    env.observation_template = "\n<output>{observation}</output>\n"
    results = {}
    for mode in ("wait for all", "partial"):
        rows = [{"id": str(i), "latencies": plan} for i, plan in enumerate(plans)]
        tasks = iter(env.make_task(row, i) for i, row in enumerate(rows))
        scripted = ScriptedActions(engine, tokenizer, tokens, {row["id"]: row["latencies"] for row in rows}, spread)
        config = RolloutConfig(max_turns=10, group_size=group_size,
                               partial=PartialRolloutConfig(enabled=mode == "partial", over_provision=1.5, max_staleness=2))
        worker = RolloutWorker(scripted, tokenizer, env, ToolExecutor(list(env.tools)), config, ToolsConfig())
        done, started = 0, time.perf_counter()
        for step in range(steps):
            count = worker.partial.tasks_needed(target) if mode == "partial" else target
            batch = await worker.run_batch([next(tasks) for _ in range(count)], seed=step, target_groups=target)
            done += sum(t.trainable for t in batch.trajectories)
            scripted.update_weights()
        results[mode] = (done, time.perf_counter() - started)
    return results


class ScriptedActions:
    """Real generation cost, scripted actions: sample ``tokens`` tokens with the engine, then
    return the scripted action's tokens instead."""

    def __init__(self, engine: HFEngine, tokenizer, tokens: int, plans: dict[str, list[int]], spread: float = 0.0):
        self.engine, self.tokenizer, self.tokens, self.plans, self.spread = engine, tokenizer, tokens, plans, spread
        self.policy_version = 0

    def tokens_for(self, task_id: str, turn: int) -> int:
        """Tokens sampled in one turn: ``tokens``, or with ``spread`` a log-normal draw around it
        (clipped to 4 .. 8 x tokens), fixed per (task, turn) so every loop samples the same amount."""
        if not self.spread:
            return self.tokens
        draw = random.Random(f"{task_id}/{turn}").lognormvariate(math.log(self.tokens), self.spread)
        return int(min(8 * self.tokens, max(4, draw)))

    def update_weights(self, state_dict=None) -> None:
        self.policy_version += 1

    async def generate(self, prompt_ids, params: SamplingParams) -> GenerationResult:
        conversation = self.tokenizer.decode(prompt_ids)
        task_id = conversation.split("Task ")[1].split(":")[0]
        turn = conversation.count("<output>")
        await self.engine.generate(prompt_ids, SamplingParams(max_new_tokens=self.tokens_for(task_id, turn),
                                                              temperature=1.0, seed=params.seed))
        plan = self.plans[task_id]
        action = f"<wait>{plan[turn]}</wait>" if turn < len(plan) else "<answer>done</answer>"
        ids = self.tokenizer.encode(action, add_special_tokens=False)
        return GenerationResult(ids, [0.0] * len(ids), "stop", None, self.policy_version)


async def turn_synchronous(worker: RolloutWorker, tasks: list[Task], turns: int) -> None:
    """Every turn: generate for all active trajectories, run all their tools, wait for all."""
    conversations = {task.id: worker.render_prompt(task) for task in tasks}
    sessions = {task.id: worker.executor.session(task.id) for task in tasks}
    active = list(tasks)
    for turn in range(turns + 1):
        results = await asyncio.gather(*(
            worker.engine.generate(conversations[t.id], SamplingParams(stop=worker.parser.stop_strings, seed=turn))
            for t in active
        ))
        parsed = [worker.parser.parse(worker.tokenizer.decode(r.token_ids)) for r in results]
        for task, result in zip(active, results):
            conversations[task.id] = conversations[task.id] + result.token_ids
        still = [(t, p) for t, p in zip(active, parsed) if p.answer is None]
        outputs = await asyncio.gather(*(sessions[t.id].run(p.calls) for t, p in still))
        for (task, _), output in zip(still, outputs):
            text = worker.env.observation_template.format(observation="\n".join(r.observation.text for r in output))
            conversations[task.id] += worker.tokenizer.encode(text, add_special_tokens=False)
        active = [t for t, _ in still]
    for session in sessions.values():
        await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated per turn (the median with --spread)")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="sigma of a log-normal spread of tokens per turn (0: every turn samples --tokens)")
    parser.add_argument("--turns", type=int, default=3, help="tool turns per trajectory (then an answer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=4, help="steps of the partial-rollout comparison")
    parser.add_argument("--groups", type=int, default=8, help="target groups per step (group size 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own); 1 on a machine other jobs load: two OpenMP "
                             "threads that wait for each other at every op run many times slower when descheduled")
    args = parser.parse_args()
    if min(args.turns, args.steps, args.groups, args.trajectories, args.tokens) < 1:
        parser.error("--turns, --steps, --groups, --trajectories and --tokens must be at least 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.model == "tiny":
        tokenizer = load_tokenizer("smollm2-135m-instruct")
        model = tiny_model(tokenizer)
    else:
        model, tokenizer = load_model(args.model)
    engine = HFEngine(model.eval(), tokenizer, max_batch_size=args.trajectories)
    env = WaitEnv()
    env.observation_template = "\n<output>{observation}</output>\n"
    plans = latencies(args.trajectories, args.turns, args.seed)
    rows = [{"id": str(i), "latencies": plans[i]} for i in range(args.trajectories)]
    tasks = [env.make_task(row, i) for i, row in enumerate(rows)]
    scripted = ScriptedActions(engine, tokenizer, args.tokens, {row["id"]: row["latencies"] for row in rows}, args.spread)
    worker = RolloutWorker(scripted, tokenizer, env, ToolExecutor(list(env.tools)), RolloutConfig(max_turns=args.turns + 1),
                           ToolsConfig())

    async def timed(coroutine) -> float:
        started = time.perf_counter()
        await coroutine
        return time.perf_counter() - started

    async def run_both():
        await engine.generate(tokenizer.encode("warm up"), SamplingParams(max_new_tokens=2))
        synchronous = await timed(turn_synchronous(worker, tasks, args.turns))
        asynchronous = await timed(worker.run_batch(tasks, group_size=1))
        partial = await partial_vs_full(engine, tokenizer, args.tokens, args.spread, args.steps, args.groups, 4, args.seed)
        return synchronous, asynchronous, partial

    synchronous, asynchronous, partial = asyncio.run(run_both())
    tool_time = sum(map(sum, plans)) / 1000
    import torch

    print(f"model {args.model} ({torch.get_num_threads()} torch threads); {args.trajectories} trajectories, {args.turns} tool turns + answer, "
          f"{args.tokens} sampled tokens per turn{f' (median; log-normal sigma {args.spread})' if args.spread else ''}, "
          f"tool latency log-normal clipped to 50-500 ms (total {tool_time:.1f} s of tool time)")
    print(f"{'loop':<28}{'wall s':>8}")
    print(f"{'turn-synchronous batched':<28}{synchronous:>8.2f}")
    print(f"{'async per trajectory':<28}{asynchronous:>8.2f}")
    print(f"speed-up: {synchronous / asynchronous:.2f}x")
    # What tools alone allow: the synchronous loop waits for the slowest call of every turn, the
    # asynchronous one for the trajectory whose calls add up to the most.
    per_turn_max = sum(max(plan[turn] for plan in plans) for turn in range(args.turns)) / 1000
    longest = max(map(sum, plans)) / 1000
    print(f"tool waits alone: {per_turn_max:.2f} s synchronous vs {longest:.2f} s asynchronous "
          f"(ratio {per_turn_max / longest:.2f}x; generation adds to both)")
    print()
    print(f"partial rollouts: {args.steps} steps of {args.groups} groups x 4 samples, 1-8 tool turns (long tail), "
          "over-provision 1.5, max staleness 2")
    print(f"{'step ends':<28}{'done':>6}{'wall s':>8}{'traj/s':>8}")
    for mode, (done, seconds) in partial.items():
        print(f"{mode:<28}{done:>6}{seconds:>8.2f}{done / seconds:>8.2f}")
    (full_done, full_s), (part_done, part_s) = partial["wait for all"], partial["partial"]
    print(f"throughput gain: {(part_done / part_s) / (full_done / full_s):.2f}x")


if __name__ == "__main__":
    main()
