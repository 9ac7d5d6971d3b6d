"""The local trainer end to end on the CPU with a tiny model: it trains, it learns a trivial tool-use
task, and a run killed with SIGKILL resumes to exactly the weights and metrics of an unbroken run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agentrl.config import build_config
from agentrl.tracking import read_metrics
from agentrl.trainer.local import train
from tests.helpers.ping_env import write_demonstrations
from tests.helpers.resume import killed_and_resumed

ROOT = Path(__file__).resolve().parent.parent


def ping_config(model_dir, output_dir, demonstrations, **sections) -> dict:
    config = {
        "output_dir": str(output_dir),
        "model": {"name": str(model_dir)},
        "env": {"name": "tests.helpers.ping_env:PingEnv", "eval_size": 8},
        "rollout": {"group_size": 4, "max_turns": 2, "max_new_tokens": 10, "max_response_tokens": 40, "max_batch_size": 32},
        "algo": {"advantage": "grpo"},
        "trainer": {"steps": 3, "prompts_per_step": 4, "minibatch_size": 8, "micro_batch_size": 4, "lr": 2e-3,
                    "eval_every": 0, "eval_before": False, "torch_threads": 1, "seed": 0},
        "sft": {"enabled": True, "data": str(demonstrations), "epochs": 10, "lr": 1e-2, "batch_size": 8},
        "tracking": {"progress": False, "sample_trajectories": 2},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values) if isinstance(values, dict) else config.update({section: values})
    return config


@pytest.fixture()
def demonstrations(tmp_path):
    return write_demonstrations(tmp_path / "demos.jsonl")


def test_a_tiny_model_trains_three_steps_end_to_end(tmp_path, tiny_model_dir, demonstrations):
    config = build_config(ping_config(tiny_model_dir, tmp_path / "run", demonstrations,
                                      trainer={"eval_every": 3, "eval_before": True}))
    initial = load_file(tiny_model_dir / "model.safetensors")
    state = train(config)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    updates = sum("update/skipped" not in row for row in rows[1:])
    # SFT bumped the version once, and each RL step that moved the policy once more
    assert state.step == 3 and updates >= 1 and state.policy_version == 1 + updates and state.data_position == 12
    assert "eval/success_rate" in rows[0] and "eval_base/success_rate" in rows[0] and "eval/success_rate" in rows[3]
    assert rows[0]["sft/loss_last"] < rows[0]["sft/loss_first"]
    for row in rows[1:]:
        assert row["trajectories"] == 16 and row["rollout/logprob_mismatch"] < 1e-3
        # a step whose groups all tie has zero advantages and must not move the policy; any other step must
        assert ("update/skipped" in row) == (row["advantage/abs_mean"] == 0) == (row["update/zero_grad_skipped"] > 0)
        assert "update/skipped" in row or row["grad_norm"] > 0
    final = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
    samples = (tmp_path / "run" / "samples" / "step-000003.jsonl").read_text().splitlines()
    assert len(samples) == 2 and json.loads(samples[0])["segments"][0]["role"] == "assistant"
    assert (tmp_path / "run" / "plot.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    assert rows[-1]["memory/peak_rss_gib"] > 0 and rows[-1]["lr"] == pytest.approx(2e-3)


def test_existing_checkpoints_are_not_overwritten_without_resume(tmp_path, tiny_model_dir, demonstrations):
    config = build_config(ping_config(tiny_model_dir, tmp_path / "run", demonstrations, trainer={"steps": 1}))
    train(config)
    with pytest.raises(FileExistsError, match="resume=true"):
        train(config)


@pytest.mark.slow
def test_a_tiny_model_learns_to_call_the_tool(tmp_path, tiny_model_dir, demonstrations):
    config = build_config(ping_config(tiny_model_dir, tmp_path / "run", demonstrations,
                                      rollout={"group_size": 8},
                                      trainer={"steps": 10, "eval_every": 10, "eval_before": True, "prompts_per_step": 6,
                                               "minibatch_size": 64, "micro_batch_size": 16}))
    train(config)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r and r["step"] > 0]
    assert sum(rewards[:3]) / 3 < 0.5  # the warm-started policy rarely pings
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_weights_and_metrics(tmp_path, tiny_model_dir, demonstrations):
    # max_batch_size=1: each request decodes alone, so no padding or batch shape changes the numbers
    straight = ping_config(tiny_model_dir, tmp_path / "straight", demonstrations,
                           trainer={"steps": 4, "deterministic": True}, rollout={"max_batch_size": 1})
    _, broken = killed_and_resumed(straight, tmp_path, kill_after_step=2, timeout=240)
    assert [r["step"] for r in read_metrics(broken / "metrics.jsonl")] == [0, 1, 2, 3, 4]
