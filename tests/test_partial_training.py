"""Partial rollouts (APRIL) inside ``agentrl train``: a step ends at ``prompts_per_step`` complete
groups and carries the rest over, carried trajectories train with truncated importance weights on
their stale tokens, and a run killed with SIGKILL resumes with exactly the trajectories it carried."""

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from agentrl.envs.base import Reward, Task

from agentrl.config import build_config
from agentrl.tracking import read_metrics
from agentrl.trainer.local import train
from tests.helpers.ping_env import PingEnv, PingTool, write_demonstrations
from tests.helpers.resume import run_cli
from tests.test_trainer import ping_config

SLOW_S = 0.5


class SlowPing(PingTool):
    """Reply to a ping; slow for the tasks marked slow (a long-tailed tool, as search or code is)."""

    name = "ping"

    async def call(self, message: str) -> str:
        """
        Args:
            message: any text.
        """
        if self.context.metadata.get("slow"):
            await asyncio.sleep(SLOW_S)
        return await super().call(message)


class SlowPingEnv(PingEnv):
    """PingEnv where every other training row's tool takes ``SLOW_S``: groups finish at different times."""

    tools = ("tests.test_partial_training:SlowPing",)

    def make_task(self, row, index):
        task = super().make_task(row, index)
        return Task(id=task.id, messages=task.messages, answer=task.answer, metadata={"slow": index % 2 == 0})

    def reward(self, task, trajectory):
        # Varies within nearly every group (the parity of the response length), so every update
        # moves the policy and tokens sampled before it are measurably off-policy after it.
        return Reward(float(len(trajectory.response_ids) % 2), True)


def partial_config(model_dir, output_dir, demonstrations, steps: int, **trainer) -> dict:
    return ping_config(
        model_dir, output_dir, demonstrations,
        env={"name": "tests.test_partial_training:SlowPingEnv"},
        rollout={"partial": {"enabled": True, "over_provision": 1.5, "max_staleness": 2}},
        trainer={"steps": steps, "minibatch_size": 64, **trainer},
        tracking={"progress": False, "sample_trajectories": 1000},
    )


def samples(run_dir: Path, step: int) -> list[dict]:
    path = run_dir / "samples" / f"step-{step:06d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture()
def demonstrations(tmp_path):
    return write_demonstrations(tmp_path / "demos.jsonl")


def test_training_with_partial_rollouts_carries_groups_and_weights_stale_tokens(tmp_path, tiny_model_dir, demonstrations):
    steps, target = 4, 4
    config = build_config(partial_config(tiny_model_dir, tmp_path / "run", demonstrations, steps))
    state = train(config)
    assert state.step == steps
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert len(rows) == steps
    for row in rows:
        assert row["partial/groups_complete"] >= target  # each step ends at the target, not before
    # over-provisioned to 1.5 x the target, the step ends before the slow groups do: they carry over
    assert sum(r["partial/groups_carried"] for r in rows) > 0
    assert sum(r["partial/trajectories_resumed"] for r in rows) > 0
    # the stream advances by the new tasks each step asked for: 1.5 x the target less what was carried
    assert rows[0]["partial/new_tasks"] == 6 and state.data_position == sum(r["partial/new_tasks"] for r in rows)
    for before, row in zip(rows, rows[1:]):
        assert row["partial/new_tasks"] == 6 - before["partial/groups_carried"]
    # carried trajectories finish with spans of an older policy; the loss weights those tokens
    stale_rows = [r for r in rows if r.get("rollout/stale_fraction", 0) > 0]
    assert stale_rows, [(r.get("rollout/stale_fraction"), r["partial/trajectories_resumed"]) for r in rows]
    for row in stale_rows:
        weight = row["rollout/stale_is_weight_mean"]
        assert 0 < weight <= config.algo.stale_is_cap and weight != pytest.approx(1.0, abs=1e-6), weight
    trained = [t for step in range(1, steps + 1) for t in samples(tmp_path / "run", step) if t["stop_reason"] != "stale"]
    assert any(len({s["policy_version"] for s in t["turns"] if s["role"] == "assistant"}) > 1 for t in trained)

def _carried(checkpoint: Path) -> list[dict]:
    """The runs the checkpoint carries into its next step (not yet done), as saved."""
    state = torch.load(checkpoint / "training.pt", weights_only=False)["partial_rollouts"] or {"groups": []}
    return [run for group in state["groups"] for run in group["runs"] if not run["done"]]


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_same_carried_trajectories(tmp_path, tiny_model_dir, demonstrations):
    steps = 6
    config = partial_config(tiny_model_dir, tmp_path / "run", demonstrations, steps, save_every=1, keep_checkpoints=10)
    process = run_cli(config, tmp_path / "run.yaml")
    root = tmp_path / "run" / "checkpoints"
    deadline, checkpoint, seen = time.monotonic() + 300, None, set()
    while checkpoint is None:  # the first RL checkpoint that carries trajectories: stop the run there
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        pointer = root / "latest"
        name = pointer.read_text().strip() if pointer.is_file() else None
        if name and name not in seen and name != "step-000000":
            seen.add(name)
            os.kill(process.pid, signal.SIGSTOP)  # frozen: no later checkpoint while we look
            name = pointer.read_text().strip()
            if int(name.split("-")[1]) < steps - 2 and _carried(root / name):
                checkpoint = root / name
                os.kill(process.pid, signal.SIGKILL)
            else:
                os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.05)
    process.wait()
    killed_at = int(checkpoint.name.split("-")[1])
    carried = {run["trajectory"]["id"]: run["trajectory"] for run in _carried(checkpoint)}

    process = run_cli({**config, "resume": True}, tmp_path / "resume.yaml")
    assert process.wait(timeout=300) == 0, process.stderr.read()

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(steps + 1))
    first = next(r for r in rows if r["step"] == killed_at + 1)
    assert first["partial/trajectories_resumed"] + first["partial/trajectories_stale"] > 0
    # every carried trajectory comes back (trained, or dropped as stale) with its saved tokens as a prefix
    later = {t["id"]: t for step in range(killed_at + 1, steps + 1) for t in samples(tmp_path / "run", step)
             if t["id"] in carried}
    assert set(later) == set(carried)
    for trajectory_id, saved in carried.items():
        resumed = later[trajectory_id]
        width = len(saved["response_ids"])
        assert resumed["prompt_ids"] == saved["prompt_ids"]
        assert resumed["response_ids"][:width] == saved["response_ids"]
        assert resumed["loss_mask"][:width] == saved["loss_mask"]
        assert resumed["logprobs"][:width] == saved["logprobs"]
        assert resumed["turns"][: len(saved["turns"])] == saved["turns"]  # spans and their policy versions
