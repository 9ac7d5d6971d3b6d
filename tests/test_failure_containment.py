"""Every failure stays inside its trajectory: an engine 4xx, a reward that raises or hangs, a bug in
a tool's wrapper or a chat template that cannot render end that one trajectory with a status and a
reason of its own; the others finish, the failures stay out of the loss (their groups too, by the
group policy) and a trainer step runs on the rest."""

import asyncio
import copy
import time

import torch
from agentrl.envs.base import Env, Reward, Task

from agentrl.config import RolloutConfig, ToolsConfig, build_config
from agentrl.executor import ToolExecutor
from agentrl.rollout import RolloutWorker
from agentrl.trajectory import FAILURE_STATUSES
from tests.helpers import faulty
from tests.helpers.faulty import FaultyEngine, FaultyEnv
from tests.helpers.scripted import ScriptedEngine

WORDS = ["engine-fails", "tool-bug", "reward-raises", "apple", "river", "stone", "cloud", "maple"]


def faulty_worker(tokenizer, engine=None, **rollout):
    env = FaultyEnv()
    engine = engine or FaultyEngine(tokenizer)
    config = RolloutConfig(group_size=4, max_turns=2, max_new_tokens=16, max_response_tokens=64, **rollout)
    return RolloutWorker(engine, tokenizer, env, ToolExecutor(list(env.tools)), config, ToolsConfig())


def tasks(env, words=WORDS):
    return [env.make_task({"id": f"t{i}", "word": word}, i) for i, word in enumerate(words)]


def test_three_failures_among_32_trajectories_leave_the_other_29_complete(tokenizer):
    worker = faulty_worker(tokenizer, group_retries=0)
    batch = asyncio.run(worker.run_batch(tasks(worker.env)))
    trajectories = batch.trajectories
    assert len(trajectories) == 32
    failed = {t.id: t for t in trajectories if t.status in FAILURE_STATUSES}
    assert sorted((t.group_id, t.status) for t in failed.values()) == [
        ("t0", "engine_error"), ("t1", "tool_error"), ("t2", "reward_error")]
    for trajectory in failed.values():
        assert trajectory.stop_reason == trajectory.status and not trajectory.trainable
        assert trajectory.reward is None
    reasons = {t.status: t.metadata["error"] for t in failed.values()}
    assert reasons["engine_error"].startswith("EngineRequestError: ") and "maximum context length" in reasons["engine_error"]
    assert reasons["tool_error"].startswith("TypeError: ")
    assert reasons["reward_error"] == "KeyError: 'gold answer column missing'"
    rest = [t for t in trajectories if t.id not in failed]
    assert len(rest) == 29 and all(t.status == "ok" and t.stop_reason == "answer" and t.reward is not None for t in rest)
    for trajectory in trajectories:
        trajectory.validate()
    # the group policy: a group with a failure is left out of the loss as a whole
    assert {t.group_id for t in trajectories if not t.trainable} == {"t0", "t1", "t2"}
    assert sum(t.trainable for t in trajectories) == 20
    metrics = batch.metrics
    assert metrics["status/engine_error"] == metrics["status/tool_error"] == metrics["status/reward_error"] == 1 / 32
    assert metrics["status/template_error"] == 0.0 and metrics["failures"] == 3.0 and metrics["groups/dropped"] == 3.0


def test_a_trainer_step_runs_on_a_batch_with_failures(tmp_path, tiny_model_dir, monkeypatch):
    from agentrl.recipes import base as recipe_parts
    from agentrl.trainer import local

    config = build_config({
        "output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_model_dir)},
        "env": {"name": "tests.helpers.faulty:FaultyEnv", "eval_size": 0},
        "rollout": {"group_size": 4, "max_turns": 2, "max_new_tokens": 16, "max_response_tokens": 64, "group_retries": 0},
        "trainer": {"steps": 1, "prompts_per_step": 8, "minibatch_size": 32, "micro_batch_size": 8, "lr": 1e-3,
                    "eval_before": False, "torch_threads": 1},
        "tracking": {"progress": False},
    })
    run = local.build_run(config)
    try:
        engine = FaultyEngine(run.tokenizer)
        run.engine = engine
        run.worker = RolloutWorker(engine, run.tokenizer, run.env, run.executor, config.rollout, config.tools)
        monkeypatch.setattr(recipe_parts, "next_tasks", lambda _run: tasks(run.env))
        before = {k: v.detach().clone() for k, v in run.model.named_parameters()}
        metrics, trajectories = local.train_step(run)
    finally:
        local.close_run(run)
    assert len(trajectories) == 32 and metrics["failures"] == 3.0
    assert metrics["update/trajectories"] == 20.0 and metrics["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in run.model.named_parameters())


def test_a_group_with_a_transient_failure_is_run_again_once(tokenizer):
    engine = FaultyEngine(tokenizer, engine_failures=1, tool_bugs=1)
    worker = faulty_worker(tokenizer, engine=engine, group_retries=1)
    batch = asyncio.run(worker.run_batch(tasks(worker.env, ["engine-fails", "tool-bug", "apple"])))
    assert all(t.status == "ok" and t.trainable for t in batch.trajectories)
    attempts = {t.group_id: t.metadata["attempt"] for t in batch.trajectories}
    assert attempts == {"t0": 1, "t1": 1, "t2": 0}
    assert batch.metrics["groups/retried"] == 2.0 and batch.metrics["groups/dropped"] == 0.0
    # a retried group is new samples: fresh seeds, fresh tool sessions
    assert engine.requests["engine-fails"] == 8 and engine.requests["tool-bug"] >= 8


def test_a_group_that_keeps_failing_is_dropped_after_its_retries(tokenizer):
    engine = FaultyEngine(tokenizer, engine_failures=9)  # every sample of two attempts, one of the third
    worker = faulty_worker(tokenizer, engine=engine, group_retries=2)
    batch = asyncio.run(worker.run_batch(tasks(worker.env, ["engine-fails", "apple"])))
    group = [t for t in batch.trajectories if t.group_id == "t0"]
    assert all(t.metadata["attempt"] == 2 and not t.trainable for t in group)
    assert sum(t.status == "engine_error" for t in group) == 1 and engine.requests["engine-fails"] == 12
    assert all(t.trainable for t in batch.trajectories if t.group_id == "t1")
    assert batch.metrics["groups/dropped"] == 1.0


def test_a_reward_past_its_timeout_is_a_reward_error_and_does_not_hold_the_batch(tokenizer):
    worker = faulty_worker(tokenizer, group_retries=0, reward_timeout_s=0.5)
    started = time.perf_counter()
    try:
        batch = asyncio.run(worker.run_batch(tasks(worker.env, ["reward-hangs", "apple"])))
    finally:
        faulty.RELEASE.set()
    assert time.perf_counter() - started < 30  # the hanging reward waits up to 60 s
    errors = [t for t in batch.trajectories if t.status == "reward_error"]
    assert [t.id for t in errors] == ["t0/1"] and "reward_timeout_s=0.5" in errors[0].metadata["error"]
    assert all(t.reward is not None for t in batch.trajectories if t.group_id == "t1")


def test_a_chat_template_that_cannot_render_a_tool_message_is_a_template_error(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = tokenizer.chat_template.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if message['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}")

    class JsonEnv(Env):
        name, tools, action_format = "json_env", ("search",), "json"

        def make_task(self, row, index):
            return Task(id=row["id"], messages=[{"role": "user", "content": row["q"]}])

        def reward(self, task, trajectory):
            return Reward(float(trajectory.answer is not None))

    call = '<tool_call>{"name": "search", "arguments": {"query": "Laskam Glimbys"}}</tool_call>'
    engine = ScriptedEngine(strict, lambda c: call if "use the tool" in c else "<answer>x</answer>")
    env = JsonEnv()
    worker = RolloutWorker(engine, strict, env, ToolExecutor(["search"]), RolloutConfig(group_retries=0), ToolsConfig())
    batch = asyncio.run(worker.run_batch([env.make_task({"id": "a", "q": "use the tool"}, 0),
                                          env.make_task({"id": "b", "q": "answer"}, 1)], group_size=2))
    statuses = sorted({(t.group_id, t.status) for t in batch.trajectories})
    assert statuses == [("a", "template_error"), ("b", "ok")]
    assert all("no tool role" in t.metadata["error"] for t in batch.trajectories if t.group_id == "a")


def test_the_viewer_shows_a_failed_trajectory_s_status_and_reason(tokenizer):
    from agentrl.viewer import render_html, view_records

    worker = faulty_worker(tokenizer, group_retries=0)
    batch = asyncio.run(worker.run_batch(tasks(worker.env, ["engine-fails"])))
    views = view_records([t.to_dict() for t in batch.trajectories])
    failed = [v for v in views if v["status"] == "engine_error"]
    assert len(failed) == 1 and "maximum context length" in failed[0]["error"]
    assert all(v["dropped"] for v in views)
    page = render_html(views)
    assert ".s-engine_error" in page and '"error": "EngineRequestError: ' in page
    assert 'el("div", "reason", t.status + ": " + t.error)' in page


def test_partial_rollouts_contain_failures_and_drop_the_group_without_a_retry(tokenizer):
    from agentrl.config import PartialRolloutConfig

    engine = FaultyEngine(tokenizer)
    worker = faulty_worker(tokenizer, engine=engine, partial=PartialRolloutConfig(enabled=True))
    batch = asyncio.run(worker.run_batch(tasks(worker.env, ["engine-fails", "apple", "river"]), target_groups=3))
    assert len(batch.trajectories) == 12 and sum(t.status == "engine_error" for t in batch.trajectories) == 1
    assert {t.group_id for t in batch.trajectories if not t.trainable} == {"t0"}
    assert batch.metrics["groups/dropped"] == 1.0 and batch.metrics["partial/groups_complete"] == 3.0
    assert engine.requests["engine-fails"] == 4  # no retry in partial mode
