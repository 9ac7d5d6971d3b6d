"""The training step composed from a recipe's parts, with the tiny model: Dr.BoT's group filter and
row masks reach the loss, SPEAR's reward term, replay batch and buffer are wired into the step, the
replay loss's ratio is taken against the collection-time logprobs, and a killed SPEAR run with a
non-empty buffer resumes exactly."""

import math

import pytest
import torch

from agentrl.algos import spear
from agentrl.config import build_config
from agentrl.recipes import get_recipe_class
from agentrl.recipes.drbot import DrBoTRecipe
from agentrl.recipes.spear import SpearRecipe
from agentrl.tracking import read_metrics
from agentrl.trainer.batching import collate, forward_response
from agentrl.trainer.local import build_run, close_run, train
from agentrl.trainer.update import LossBatch, update
from tests.helpers.resume import killed_and_resumed
from tests.test_trainer import ping_config, write_demonstrations

SPEAR = {"buffer_size": 2, "trigger_factor": 0.5, "max_staleness": 2, "tool_call_steps": 4, "sil_ramp_steps": 2}


@pytest.fixture()
def demonstrations(tmp_path):
    return write_demonstrations(tmp_path / "demos.jsonl")


def spear_config(tiny_model_dir, output_dir, demonstrations, **sections):
    data = ping_config(tiny_model_dir, output_dir, demonstrations, recipe="spear", spear=dict(SPEAR),
                       algo={"advantage": "dr_grpo", "loss_agg": "dr-grpo", "dual_clip": 10.0},
                       drbot={"group_keep_ratio": 0.75, "masks": []},  # the masks: their own test
                       trainer={"log_entropy": True, "prompts_per_step": 8, "minibatch_size": 16, "lr": 5e-4})
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def warm_run(config):
    """A run after its SFT warm start: the tiny model then pings in about half its trajectories."""
    from agentrl.trainer.sft import sft_warm_start

    run = build_run(config)
    sft_warm_start(run)
    run.engine.update_weights()
    return run


def test_recipes_are_found_by_name_and_by_import_path():
    assert get_recipe_class("spear") is SpearRecipe and get_recipe_class("drbot") is DrBoTRecipe
    assert get_recipe_class("agentrl.recipes.spear:SpearRecipe") is SpearRecipe
    with pytest.raises(LookupError, match="did you mean 'spear'"):
        get_recipe_class("spaer")
    with pytest.raises(LookupError, match="not a Recipe subclass"):
        get_recipe_class("agentrl.trainer.update:LossBatch")


def test_drbot_keeps_the_groups_with_the_largest_std_trimmed_to_a_power_of_two_and_masks_flagged_rows(
        tmp_path, tiny_model_dir, demonstrations):
    # 4 groups of 4: 0.75 keeps 3 groups (12 rows), trimmed to 8 rows
    config = build_config(ping_config(tiny_model_dir, tmp_path / "run", demonstrations, recipe="drbot",
                                      drbot={"masks": ["incomplete"]}))
    run = build_run(config)
    try:
        recipe = run.recipe
        trajectories, _ = recipe.collect(1)
        for index, trajectory in enumerate(trajectories):  # hand-set rewards: group stds 0, 0.5, 0.5 and 0.43
            group = sorted({t.group_id for t in trajectories}).index(trajectory.group_id)
            position = index % 4
            trajectory.reward = [0.0, float(position % 2), float(position < 2), float(position == 0)][group]
        trainable, _, metrics = recipe.select(trajectories, 1)
        groups = sorted({t.group_id for t in trajectories})
        assert len(trainable) == 8 and groups[0] not in {t.group_id for t in trainable}  # the tied group is dropped
        assert metrics["drbot/kept_rows"] == 8.0
        parts, mask_metrics = recipe.loss_batches(trainable, 1)
        incomplete = [t.answer is None for t in trainable]
        assert mask_metrics["drbot/incomplete_rows"] == float(sum(incomplete))
        kept_tokens = parts[0].batch.loss_mask.sum(-1)
        for row, flagged in enumerate(incomplete):
            assert (kept_tokens[row] == 0) == flagged  # a flagged row leaves the loss; the others keep theirs
    finally:
        close_run(run)


def test_spear_adds_the_faded_tool_call_reward_and_charges_malformed_calls(tmp_path, tiny_model_dir, demonstrations):
    config = build_config(spear_config(tiny_model_dir, tmp_path / "run", demonstrations))
    run = warm_run(config)
    try:
        trajectories, _ = run.recipe.collect(2)
        outcome = [t.reward for t in trajectories]
        metrics = run.recipe.score(trajectories, 2)
        weight = (math.cos(math.pi * 2 / 4) + 1) / 2  # T_tc = 4, step 2: 0.5
        assert metrics["spear/tool_call_weight"] == pytest.approx(weight)
        for trajectory, before in zip(trajectories, outcome, strict=True):
            turns = len({c.turn for c in trajectory.tool_calls if c.status != "format_error"})
            invalid = sum(c.status == "format_error" for c in trajectory.tool_calls)
            assert trajectory.metrics["reward/outcome"] == before
            assert trajectory.reward == pytest.approx(before + weight * min(1.0, 0.1 * turns) - 0.1 * invalid)
        assert any(t.reward != t.metrics["reward/outcome"] for t in trajectories)  # the term really acts
    finally:
        close_run(run)


def test_the_replay_ratio_is_taken_against_the_stored_collection_logprobs(tmp_path, tiny_model_dir, demonstrations):
    # one minibatch: every ratio is taken before the replay's own optimizer step moves the policy
    config = build_config(spear_config(tiny_model_dir, tmp_path / "run", demonstrations, trainer={"prompts_per_step": 4}))
    run = build_run(config)
    try:
        trajectories, _ = run.recipe.collect(1)
        batch = collate(trajectories, run.tokenizer.pad_token_id, run.engine.policy_version)
        with torch.no_grad():
            current = forward_response(run.model, batch).logprobs * batch.loss_mask
        advantages = torch.ones(batch.size)
        results = {}
        for name, shift, weight in (("same", 0.0, 1.0), ("doubled", math.log(2.0), 1.0), ("weightless", 0.0, 0.0)):
            before = [p.detach().clone() for p in run.model.parameters()]
            # the stored logprobs as if the rows were collected by a policy that gave them half the probability
            part = LossBatch(batch, trajectories, name="sil", kind="replay", advantages=advantages,
                             old_logprobs=(current - shift) * batch.loss_mask, weight=weight)
            results[name] = update(run, [part], step=1)
            moved = any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))
            results[name]["moved"] = moved
            for parameter, value in zip(run.model.parameters(), before, strict=True):  # undo, for the next case
                parameter.data.copy_(value)
            run.optimizer.state.clear()
    finally:
        close_run(run)
    assert results["same"]["sil/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert results["same"]["sil/clip_fraction"] == 0.0 and results["same"]["moved"]
    assert results["doubled"]["sil/ratio_mean"] == pytest.approx(2.0, rel=1e-3)
    assert results["doubled"]["sil/clip_fraction"] == pytest.approx(1.0)  # 2 > 1 + 0.28 with A > 0: all clipped
    assert not results["weightless"]["moved"]  # w_sil = 0 (the ramp's start) leaves the policy alone


def test_a_spear_step_buffers_positive_rows_replays_them_and_logs_both_batches(tmp_path, tiny_model_dir, demonstrations):
    config = build_config(spear_config(tiny_model_dir, tmp_path / "run", demonstrations, trainer={"steps": 4}))
    state = train(config)
    assert state.step == 4
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert all("spear/tool_call_weight" in r and "spear/buffer_rows" in r for r in rows)
    assert all("entropy" in r for r in rows if "update/skipped" not in r)
    assert [r["spear/tool_call_weight"] for r in rows] == pytest.approx([spear.tool_call_weight(s, "cosine", 4)
                                                                       for s in (1, 2, 3, 4)])
    replays = [r for r in rows if r["spear/replay_event"] == 1.0 and r["spear/replay_rows"] > 0]
    assert replays, [(r["spear/buffer_rows"], r["spear/buffer_rows_above_baseline"]) for r in rows]
    for row in replays:  # the replay batch trained, at the ramp's weight, after the on-policy one
        assert row["sil/rows"] == row["spear/replay_rows"]
        # rows whose recalibrated advantages are all 0 carry no signal: their step is skipped, not taken
        assert (row["sil/updates"] >= 1) == (row["spear/replay_advantage_max"] > 0) != (row["sil/zero_grad_skipped"] > 0)
        assert row["sil/weight"] == pytest.approx(spear.sil_weight(row["step"], 1.0, 2))
        assert "sil/clip_fraction" in row and "clip_fraction" in row
        assert row["spear/replay_advantage_min"] >= 0.0
    assert all(r["update/trajectories"] == 16.0 for r in rows if "update/trajectories" in r)  # 6 of 8 groups, 24 -> 16 rows


@pytest.mark.slow
def test_a_killed_spear_run_with_a_non_empty_buffer_resumes_exactly(tmp_path, tiny_model_dir, demonstrations):
    straight = spear_config(tiny_model_dir, tmp_path / "straight", demonstrations,
                            trainer={"steps": 4, "deterministic": True}, rollout={"max_batch_size": 1})
    straight_dir, _ = killed_and_resumed(straight, tmp_path, kill_after_step=2, timeout=280)
    rows = read_metrics(straight_dir / "metrics.jsonl")
    assert rows[2]["spear/buffer_rows"] > 0  # the buffer the step-2 checkpoint holds is not empty
    assert any(r.get("spear/replay_event") == 1.0 for r in rows[3:])  # a replay after the resume point
