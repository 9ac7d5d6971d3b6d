"""Rollout wall time: the asynchronous per-trajectory loop vs a turn-synchronous batched loop (every
trajectory waits for the whole batch at each turn, as Search-R1 and early VerlTool do), same model,
prompts, seeds and tool latencies, in one run.

Generation is real (the embedded SmolLM2-135M through the batched HF engine, a fixed number of
sampled tokens per turn); the actions are scripted so that both loops make exactly the same tool
calls: 3 tool turns, then an answer. Each call's latency is drawn once from a log-normal
distribution clipped to 50-500 ms, so both loops wait for identical tools.

    .venv/bin/python bench/rollout.py [--trajectories 32] [--tokens 16] [--model smollm2-135m-instruct|tiny]

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

from agentrl.config import RolloutConfig, ToolsConfig  # noqa: E402
from agentrl.engines.base import GenerationResult, SamplingParams  # noqa: E402
from agentrl.engines.hf import HFEngine  # noqa: E402
from agentrl.envs.base import Env, Reward, Task  # noqa: E402
from agentrl.executor import ToolExecutor  # noqa: E402
from agentrl.models import load_model, load_tokenizer, tiny_model  # noqa: E402
from agentrl.rollout import RolloutWorker  # noqa: E402
from agentrl.tool import Tool  # noqa: E402

TOOL_TURNS = 3


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


def latencies(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[int(min(500, max(50, rng.lognormvariate(math.log(150), 0.6)))) for _ in range(TOOL_TURNS)] for _ in range(count)]


class ScriptedActions:
    """Real generation cost, scripted actions: sample ``tokens`` tokens with the engine, then
    return the scripted action's tokens instead."""

    def __init__(self, engine: HFEngine, tokenizer, tokens: int, plans: dict[str, list[int]]):
        self.engine, self.tokenizer, self.tokens, self.plans = engine, tokenizer, tokens, plans
        self.policy_version = 0

    async def generate(self, prompt_ids, params: SamplingParams) -> GenerationResult:
        await self.engine.generate(prompt_ids, SamplingParams(max_new_tokens=self.tokens, temperature=1.0, seed=params.seed))
        conversation = self.tokenizer.decode(prompt_ids)
        task_id = conversation.split("Task ")[1].split(":")[0]
        turn = conversation.count("<output>")
        plan = self.plans[task_id]
        action = f"<wait>{plan[turn]}</wait>" if turn < len(plan) else "<answer>done</answer>"
        ids = self.tokenizer.encode(action, add_special_tokens=False)
        return GenerationResult(ids, [0.0] * len(ids), "stop", None, 0)


async def turn_synchronous(worker: RolloutWorker, tasks: list[Task]) -> None:
    """Every turn: generate for all active trajectories, run all their tools, wait for all."""
    conversations = {task.id: worker.render_prompt(task) for task in tasks}
    sessions = {task.id: worker.executor.session(task.id) for task in tasks}
    active = list(tasks)
    for turn in range(TOOL_TURNS + 1):
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
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated per turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    if args.model == "tiny":
        tokenizer = load_tokenizer("smollm2-135m-instruct")
        model = tiny_model(tokenizer)
    else:
        model, tokenizer = load_model(args.model)
    engine = HFEngine(model.eval(), tokenizer, max_batch_size=args.trajectories)
    env = WaitEnv()
    env.observation_template = "\n<output>{observation}</output>\n"
    plans = latencies(args.trajectories, args.seed)
    rows = [{"id": str(i), "latencies": plans[i]} for i in range(args.trajectories)]
    tasks = [env.make_task(row, i) for i, row in enumerate(rows)]
    scripted = ScriptedActions(engine, tokenizer, args.tokens, {row["id"]: row["latencies"] for row in rows})
    worker = RolloutWorker(scripted, tokenizer, env, ToolExecutor(list(env.tools)), RolloutConfig(max_turns=TOOL_TURNS + 1),
                           ToolsConfig())

    async def timed(coroutine) -> float:
        started = time.perf_counter()
        await coroutine
        return time.perf_counter() - started

    async def run_both():
        await engine.generate(tokenizer.encode("warm up"), SamplingParams(max_new_tokens=2))
        synchronous = await timed(turn_synchronous(worker, tasks))
        asynchronous = await timed(worker.run_batch(tasks, group_size=1))
        return synchronous, asynchronous

    synchronous, asynchronous = asyncio.run(run_both())
    tool_time = sum(map(sum, plans)) / 1000
    print(f"model {args.model}; {args.trajectories} trajectories, {TOOL_TURNS} tool turns + answer, {args.tokens} sampled tokens per turn, "
          f"tool latency log-normal clipped to 50-500 ms (total {tool_time:.1f} s of tool time)")
    print(f"{'loop':<28}{'wall s':>8}")
    print(f"{'turn-synchronous batched':<28}{synchronous:>8.2f}")
    print(f"{'async per trajectory':<28}{asynchronous:>8.2f}")
    print(f"speed-up: {synchronous / asynchronous:.2f}x")


if __name__ == "__main__":
    main()
