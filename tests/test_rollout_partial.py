"""Partial rollouts: the step ends at the target number of complete groups, unfinished
trajectories carry over with the policy version of every span, stale ones are dropped, and the
carried state survives a checkpoint round trip."""

import asyncio
import json
import time

from agentrl.envs.base import Reward, Task
from agentrl.envs.search_qa import SearchQAEnv

from agentrl.config import PartialRolloutConfig, RolloutConfig, ToolsConfig
from agentrl.executor import ToolExecutor
from agentrl.rollout import RolloutWorker
from agentrl.tool import Tool
from tests.helpers.scripted import ScriptedEngine

SLEEPER = "tests.helpers.demo_tools:Sleeper"


class SleepEnv(SearchQAEnv):
    tools = (SLEEPER,)
    tags = {"sleep": "sleeper"}

    def make_task(self, row, index):
        return Task(id=row["id"], messages=[{"role": "user", "content": row["id"]}], answer=["done"])

    def reward(self, task, trajectory):
        return Reward(float(trajectory.answer == "done"), trajectory.answer == "done")


SLOW_FIRST_CALL_S = 3.0  # far beyond what the fast groups take, even on a loaded machine


def script(conversation: str) -> str:
    """Fast tasks: one 10 ms tool call. Slow tasks: a 3 s call, then two 10 ms ones. Then the answer."""
    slow = "user\nslow" in conversation
    done = conversation.count("<information>")
    if done >= (3 if slow else 1):
        return "<answer>done</answer>"
    return f"<sleep>{SLOW_FIRST_CALL_S if slow and done == 0 else 0.01}</sleep>"


def make_worker(tokenizer, max_staleness=1):
    rollout = RolloutConfig(max_turns=5, group_size=2,
                            partial=PartialRolloutConfig(enabled=True, over_provision=1.5, max_staleness=max_staleness))
    return RolloutWorker(ScriptedEngine(tokenizer, script, 0.005), tokenizer, SleepEnv(), ToolExecutor([SLEEPER]),
                         rollout, ToolsConfig())


TASKS = [{"id": "fast-a"}, {"id": "fast-b"}, {"id": "slow"}]


def first_step(worker):
    tasks = [worker.env.make_task(row, i) for i, row in enumerate(TASKS)]
    started = time.perf_counter()
    batch = asyncio.run(worker.run_batch(tasks, seed=1, target_groups=2))
    return batch, time.perf_counter() - started


def test_step_ends_at_the_target_and_unfinished_groups_carry_over(tokenizer):
    worker = make_worker(tokenizer)
    assert worker.partial.tasks_needed(2) == 3
    batch, elapsed = first_step(worker)
    assert elapsed < SLOW_FIRST_CALL_S  # did not wait for the slow group's tools
    assert sorted({t.group_id for t in batch.trajectories}) == ["fast-a", "fast-b"]
    assert all(t.reward == 1.0 and t.policy_version == 0 for t in batch.trajectories)
    assert batch.metrics["partial/groups_carried"] == 1.0
    assert worker.partial.tasks_needed(2) == 2
    carried = worker.partial.carried[0].runs
    assert all(not run.done and run.tools_pending and run.trajectory.num_turns == 1 for run in carried)


def test_carried_trajectories_continue_with_the_new_policy_version(tokenizer):
    worker = make_worker(tokenizer)
    first_step(worker)
    before = [list(run.trajectory.response_ids) for run in worker.partial.carried[0].runs]
    worker.engine.update_weights()  # policy version 1
    batch = asyncio.run(worker.run_batch([], seed=2, target_groups=1))
    assert [t.id for t in batch.trajectories] == ["slow/0", "slow/1"]
    assert batch.metrics["partial/trajectories_resumed"] == 2.0 and not worker.partial.carried
    for trajectory, prefix in zip(batch.trajectories, before):
        trajectory.validate()
        assert trajectory.response_ids[: len(prefix)] == prefix  # the old tokens are kept as they were
        versions = [(s.turn, s.policy_version) for s in trajectory.turns if s.role == "assistant"]
        assert versions == [(0, 0), (1, 1), (2, 1), (3, 1)]
        assert trajectory.stop_reason == "answer" and trajectory.reward == 1.0 and trajectory.trainable
        assert [c.status for c in trajectory.tool_calls] == ["ok"] * 3


def test_trajectories_beyond_the_maximum_staleness_are_dropped(tokenizer):
    worker = make_worker(tokenizer, max_staleness=0)
    first_step(worker)
    worker.engine.update_weights()
    batch = asyncio.run(worker.run_batch([], seed=2, target_groups=1))
    assert [t.stop_reason for t in batch.trajectories] == ["stale", "stale"]
    assert not any(t.trainable for t in batch.trajectories)
    assert batch.metrics["partial/trajectories_stale"] == 2.0 and "reward_mean" not in batch.metrics


def test_partial_state_survives_a_checkpoint_round_trip(tokenizer):
    worker = make_worker(tokenizer)
    first_step(worker)
    state = json.loads(json.dumps(worker.state_dict()))
    restored = make_worker(tokenizer)
    restored.load_state_dict(state)
    restored.engine.update_weights()
    batch = asyncio.run(restored.run_batch([], seed=2, target_groups=1))
    assert [t.id for t in batch.trajectories] == ["slow/0", "slow/1"]
    assert all(t.reward == 1.0 for t in batch.trajectories)
    assert [s.policy_version for s in batch.trajectories[0].turns if s.role == "assistant"] == [0, 1, 1, 1]


def test_evaluation_can_bypass_partial_mode(tokenizer):
    worker = make_worker(tokenizer)
    tasks = [worker.env.make_task(row, i) for i, row in enumerate(TASKS)]
    batch = asyncio.run(worker.run_batch(tasks, group_size=1, partial=False))
    assert len(batch.trajectories) == 3 and not worker.partial.carried


class SlowToClose(Tool):
    """Answer at once; closing takes a while, as a sandbox session or a tool server release does."""

    name = "slow_close"
    closing: asyncio.Event | None = None  # set when the first close begins

    async def call(self, x: int = 0) -> str:
        return "ok"

    async def close(self) -> None:
        if SlowToClose.closing is not None and not SlowToClose.closing.is_set():
            SlowToClose.closing.set()
            await asyncio.sleep(30)


class SlowCloseEnv(SleepEnv):
    tools = ("tests.test_rollout_partial:SlowToClose",)
    tags = {"check": "slow_close"}


def test_a_trajectory_cancelled_while_its_tools_close_does_not_generate_again(tokenizer):
    def answer_after_one_call(conversation: str) -> str:
        return "<answer>done</answer>" if "<information>" in conversation else "<check>1</check>"

    engine = ScriptedEngine(tokenizer, answer_after_one_call)
    worker = RolloutWorker(engine, tokenizer, SlowCloseEnv(), ToolExecutor(list(SlowCloseEnv.tools)),
                           RolloutConfig(max_turns=5), ToolsConfig())
    run = worker.new_run(worker.env.make_task({"id": "t"}, 0), 0, seed=1)

    async def main():
        SlowToClose.closing = asyncio.Event()
        first = asyncio.ensure_future(worker.advance(run))
        await asyncio.wait_for(SlowToClose.closing.wait(), 10)  # the answer is in; the session is closing
        first.cancel()  # the step ends here (partial rollouts cancel whatever is still running)
        await asyncio.gather(first, return_exceptions=True)
        calls = engine.calls
        await worker.advance(run)  # the next step continues the run
        return calls

    calls = asyncio.run(main())
    trajectory = run.trajectory
    assert engine.calls == calls == 2  # nothing generated after the answer
    assert trajectory.stop_reason == "answer" and trajectory.reward == 1.0 and run.done
    assert [(s.role, s.turn) for s in trajectory.turns] == [("assistant", 0), ("observation", 0), ("assistant", 1)]
    assert tokenizer.decode(trajectory.response_ids).count("<answer>") == 1


def test_the_carried_pool_restores_exactly_from_its_saved_state(tokenizer):
    worker = make_worker(tokenizer)
    first_step(worker)
    state = json.loads(json.dumps(worker.state_dict()))
    restored = make_worker(tokenizer)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    saved, loaded = worker.partial.carried, restored.partial.carried
    assert [g.task for g in saved] == [g.task for g in loaded]
    for before, after in zip([r for g in saved for r in g.runs], [r for g in loaded for r in g.runs]):
        assert before.trajectory.to_dict() == after.trajectory.to_dict()
        assert (before.seed, before.turn, before.tools_pending, before.finish_reason, before.done) == \
            (after.seed, after.turn, after.tools_pending, after.finish_reason, after.done)


def test_a_group_with_a_run_past_the_staleness_bound_is_dropped_whole(tokenizer):
    worker = make_worker(tokenizer, max_staleness=1)
    first_step(worker)
    finished, left = worker.partial.carried[0].runs
    asyncio.run(worker.advance(finished))  # one sample of the slow group completes...
    assert finished.done and finished.trajectory.trainable
    worker.engine.update_weights()
    worker.engine.update_weights()  # ...and the other's version-0 tokens are now 2 versions old
    batch = asyncio.run(worker.run_batch([], seed=2, target_groups=1))
    assert [t.stop_reason for t in batch.trajectories] == ["answer", "stale"]
    assert batch.trajectories[0].metadata["dropped"] and not any(t.trainable for t in batch.trajectories)
    # a group with nothing left to train does not count towards the step's target
    assert batch.metrics["partial/groups_complete"] == 0.0 and batch.metrics["partial/trajectories_stale"] == 1.0
