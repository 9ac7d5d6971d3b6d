"""SPEAR's pure parts on hand-built cases: the two schedules, the shaped reward, each replay-buffer
rule (entry, staleness, trigger, recalibration, subset size, flush), exact resume, and the replay
loss's ratio taken against the logprobs stored at collection time."""

import json
import math

import pytest
import torch

from agentrl.algos.spear import (
    BaselineMemory,
    ReplayBuffer,
    count_invalid_actions,
    count_tool_call_turns,
    group_statistics,
    recalibrated_advantages,
    replay_metrics,
    schedule_metrics,
    shape_rewards,
    sil_loss,
    sil_weight,
    tool_call_bonus,
    tool_call_weight,
)
from agentrl.trajectory import ToolCallRecord, Trajectory


def make_trajectory(name: str, group: str, tokens: int = 3, tool_turns: int = 0) -> Trajectory:
    trajectory = Trajectory(id=name, group_id=group, prompt_ids=[1, 2])
    trajectory.append_model_tokens(list(range(10, 10 + tokens)), [-0.5] * tokens, turn=0, policy_version=0)
    for turn in range(tool_turns):
        trajectory.tool_calls.append(ToolCallRecord("search", {"query": "q"}, turn))
    return trajectory


def add_groups(buffer: ReplayBuffer, step: int, groups: dict[str, list[float]], tool_turns: int = 0,
               width: int = 4) -> list[Trajectory]:
    """One step's batch: each group's rows with Dr.GRPO advantages r - mean(group)."""
    trajectories, rewards, advantages = [], [], []
    for group, values in groups.items():
        mean = sum(values) / len(values)
        for index, reward in enumerate(values):
            trajectories.append(make_trajectory(f"{step}-{group}-{index}", group, 3, tool_turns))
            rewards.append(reward)
            advantages.append(reward - mean)
    rows = len(trajectories)
    old_logprobs = -torch.arange(rows * width, dtype=torch.float32).reshape(rows, width) / 10
    loss_mask = torch.zeros(rows, width)
    loss_mask[:, :3] = 1
    buffer.add(step, trajectories, torch.tensor(rewards), torch.tensor(advantages), old_logprobs, loss_mask)
    return trajectories


# -- schedules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("step", "expected"), [(0, 1.0), (50, (math.cos(math.pi / 4) + 1) / 2), (100, 0.5),
                                                (200, 0.0), (201, 0.0), (1000, 0.0)])
def test_tool_call_weight_decays_by_cosine_to_zero_at_T_and_stays_there(step, expected):
    assert tool_call_weight(step, "cosine", 200) == pytest.approx(expected, abs=1e-12)


def test_constant_and_none_tool_call_schedules_ignore_the_step():
    assert [tool_call_weight(t, "constant", 200) for t in (0, 100, 500)] == [1.0, 1.0, 1.0]
    assert [tool_call_weight(t, "none", 200) for t in (0, 100, 500)] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="cosine, constant or none"):
        tool_call_weight(0, "linear", 200)
    with pytest.raises(ValueError, match="decay_steps > 0"):
        tool_call_weight(0, "cosine", 0)


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (150, 1.0), (300, 2.0), (301, 2.0), (900, 2.0)])
def test_sil_weight_ramps_from_zero_to_the_coefficient_over_T_sil(step, expected):
    assert sil_weight(step, coef=2.0, ramp_steps=300) == pytest.approx(expected, abs=1e-12)
    assert sil_weight(75, coef=2.0, ramp_steps=300) == pytest.approx(2.0 * (1 - math.cos(math.pi / 4)) / 2)
    assert sil_weight(0, coef=2.0, ramp_steps=0) == 2.0


def test_schedule_metrics_report_both_weights():
    assert schedule_metrics(100, tool_call_steps=200, sil_coef=1.0, sil_ramp_steps=200) == pytest.approx(
        {"spear/tool_call_weight": 0.5, "spear/sil_weight": 0.5})


# -- the shaped reward ---------------------------------------------------------------------------


def test_shaped_reward_adds_the_weighted_capped_tool_bonus_and_charges_invalid_actions():
    outcome = torch.tensor([1.0, -1.0, 0.0])
    calls = torch.tensor([3, 15, 0])
    invalid = torch.tensor([0, 2, 1])
    rewards, metrics = shape_rewards(outcome, calls, invalid, step=0, decay_steps=200)
    assert rewards.tolist() == pytest.approx([1.3, -0.2, -0.1])  # min(1, 1.5) caps the second bonus
    assert metrics["spear/tool_call_weight"] == 1.0
    rewards, metrics = shape_rewards(outcome, calls, invalid, step=100, decay_steps=200)
    assert rewards.tolist() == pytest.approx([1.15, -0.7, -0.1])
    assert metrics["spear/tool_call_weight"] == pytest.approx(0.5)
    rewards, _ = shape_rewards(outcome, calls, invalid, step=250, decay_steps=200)
    assert rewards.tolist() == pytest.approx([1.0, -1.2, -0.1])
    rewards, _ = shape_rewards(outcome, calls, None, step=0, schedule="none")
    assert rewards.tolist() == pytest.approx(outcome.tolist())


def test_qwen3_variant_pays_a_correct_answer_the_whole_bonus_for_any_tool_use():
    outcome = torch.tensor([1.0, 1.0, -1.0, 0.0])
    calls = torch.tensor([5, 0, 5, 12])
    assert tool_call_bonus(calls, outcome, "qwen3").tolist() == pytest.approx([1.0, 0.0, 0.5, 1.0])
    assert tool_call_bonus(calls, outcome, "count").tolist() == pytest.approx([0.5, 0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="outcome rewards"):
        tool_call_bonus(calls, None, "qwen3")


def test_tool_calls_count_per_turn_and_malformed_calls_are_invalid_actions():
    trajectory = make_trajectory("t", "g")
    trajectory.tool_calls += [ToolCallRecord("search", {}, 0), ToolCallRecord("python", {}, 0),
                              ToolCallRecord("search", {}, 2, status="error"),
                              ToolCallRecord("", {}, 3, status="format_error")]
    assert count_tool_call_turns(trajectory) == 2
    assert count_invalid_actions(trajectory) == 1


# -- the baseline memory -------------------------------------------------------------------------


def test_group_statistics_are_means_and_population_stds_per_group():
    means, stds = group_statistics([1.0, 0.0, 3.0, 3.0, 5.0], ["a", "a", "b", "b", "c"])
    assert means == [0.5, 3.0, 5.0]
    assert stds == [0.5, 0.0, 0.0]


def test_baseline_memory_evicts_oldest_steps_before_appending_past_capacity():
    memory = BaselineMemory(capacity=4)
    memory.record(1, [1.0, 2.0, 3.0], [0.0] * 3)
    memory.record(2, [4.0, 5.0, 6.0], [0.0] * 3)  # 3 <= 4 stored: nothing evicted
    assert memory.size == 6
    memory.record(3, [7.0, 8.0, 9.0], [0.0] * 3)  # 6 > 4: step 1 goes, then 3 <= 4
    assert [r["step"] for r in memory.records] == [2, 3]
    assert memory.median_mean() == pytest.approx(6.5)


# -- entry and staleness -------------------------------------------------------------------------


def test_only_positive_advantage_rows_enter_with_their_collection_logprobs_and_step():
    buffer = ReplayBuffer(capacity=8)
    trajectories = [make_trajectory(f"t{i}", "g") for i in range(4)]
    old_logprobs = torch.tensor([[-0.1, -0.2, -0.3, 0.0], [-1.0, -1.0, -1.0, 0.0],
                                 [-2.0, -2.0, -2.0, 0.0], [-0.7, -0.8, -0.9, 0.0]])
    loss_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 4)
    added = buffer.add(7, trajectories, torch.tensor([1.5, -0.5, 0.5, 2.5]), torch.tensor([0.5, -1.5, 0.0, 1.5]),
                       old_logprobs, loss_mask)
    assert added == 2 and len(buffer) == 2
    first, second = buffer.entries
    assert first["trajectory"]["id"] == "t0" and second["trajectory"]["id"] == "t3"
    assert first["old_logprobs"] == pytest.approx([-0.1, -0.2, -0.3])  # cut to the row's response
    assert second["old_logprobs"] == pytest.approx([-0.7, -0.8, -0.9])
    assert (first["step"], first["reward"], second["reward"]) == (7, 1.5, 2.5)
    assert buffer.memory.records == [{"step": 7, "means": [1.0], "stds": [pytest.approx(math.sqrt(1.25))]}]


def test_rows_whose_loss_mask_was_emptied_or_without_tool_calls_do_not_enter():
    buffer = ReplayBuffer(capacity=8, require_tool_call=True)
    trajectories = [make_trajectory("masked", "g", tool_turns=1), make_trajectory("no-tool", "g"),
                    make_trajectory("ok", "g", tool_turns=2)]
    loss_mask = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    buffer.add(1, trajectories, torch.ones(3), torch.ones(3), torch.zeros(3, 3), loss_mask)
    assert [e["trajectory"]["id"] for e in buffer.entries] == ["ok"]


def test_token_level_advantages_enter_by_the_sign_of_their_masked_sum():
    buffer = ReplayBuffer(capacity=8)
    trajectories = [make_trajectory("up", "g"), make_trajectory("down", "g")]
    advantages = torch.tensor([[1.0, -0.5, 0.0, -9.0], [-1.0, 0.5, 0.0, 9.0]])  # column 3 is masked
    loss_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)
    buffer.add(1, trajectories, torch.tensor([1.0, 0.0]), advantages, torch.zeros(2, 4), loss_mask)
    assert [e["trajectory"]["id"] for e in buffer.entries] == ["up"]


def test_entries_older_than_the_staleness_bound_are_dropped_on_insertion():
    buffer = ReplayBuffer(capacity=64, max_staleness=2)
    for step in (1, 2, 3):
        add_groups(buffer, step, {"g": [1.0, 0.0]})
    assert [e["step"] for e in buffer.entries] == [1, 2, 3]
    add_groups(buffer, 4, {"g": [1.0, 0.0]})  # 4 - 1 = 3 > 2
    assert [e["step"] for e in buffer.entries] == [2, 3, 4]
    add_groups(buffer, 6, {"g": [0.0, 0.0]})  # nothing positive enters; age counts from the current step
    assert [e["step"] for e in buffer.entries] == [4]


def test_add_rejects_tensors_that_do_not_match_the_trajectories():
    buffer = ReplayBuffer(capacity=8)
    with pytest.raises(ValueError, match="must agree"):
        buffer.add(1, [make_trajectory("t", "g")], torch.ones(2), torch.ones(2), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="response tokens"):
        buffer.add(1, [make_trajectory("ok", "g"), make_trajectory("long", "g", tokens=5)], torch.ones(2),
                   torch.ones(2), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="finite"):
        buffer.add(1, [make_trajectory("t", "g")], torch.tensor([float("nan")]), torch.ones(1), torch.zeros(1, 3),
                   torch.ones(1, 3))
    assert len(buffer) == 0 and buffer.memory.size == 0  # nothing half-stored


# -- trigger -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("capacity", "groups", "ready"), [(4, 6, False), (4, 7, True), (5, 7, False), (5, 8, True)])
def test_replay_fires_only_when_more_than_one_and_a_half_N_rows_beat_the_median(capacity, groups, ready):
    # every group is [1, -1]: the group means are 0, so P50 = 0 and each group's reward-1 row enters and beats it
    buffer = ReplayBuffer(capacity=capacity, max_staleness=100)
    add_groups(buffer, 1, {f"g{i}": [1.0, -1.0] for i in range(groups)})
    assert buffer.rows_above_baseline() == groups
    assert buffer.replay_ready() is ready
    assert (buffer.draw_replay() is not None) is ready


def test_rows_at_or_below_the_median_group_mean_do_not_count_towards_the_trigger():
    buffer = ReplayBuffer(capacity=2, max_staleness=100)
    # means [2, 0, 4, 2, 0] -> P50 = 2; the positive rows are 3, 1, 5, 4 and 2 (which ties P50)
    add_groups(buffer, 1, {"a": [3.0, 1.0], "b": [1.0, -1.0], "c": [5.0, 3.0], "d": [4.0, 0.0], "e": [2.0, -2.0]})
    assert buffer.memory.median_mean() == pytest.approx(2.0)
    assert sorted(e["reward"] for e in buffer.entries) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert buffer.rows_above_baseline() == 3  # 3, 4 and 5; 1 is below and 2 ties
    assert not buffer.replay_ready()  # 3 is not more than 1.5 * 2
    buffer.capacity = 1
    assert buffer.replay_ready()  # 3 > 1.5


# -- recalibration, subset, flush ----------------------------------------------------------------


def test_recalibrated_advantages_are_reward_minus_median_optionally_over_median_std():
    memory = BaselineMemory()
    memory.record(1, [2.0, 0.0, 4.0], [1.0, 3.0, 2.0])
    rewards = torch.tensor([3.0, 1.0, 5.0, 2.0])
    assert recalibrated_advantages(rewards, memory).tolist() == pytest.approx([1.0, -1.0, 3.0, 0.0])
    assert recalibrated_advantages(rewards, memory, norm_std=True).tolist() == pytest.approx(
        [0.5, -0.5, 1.5, 0.0], rel=1e-5)
    with pytest.raises(ValueError, match="baseline memory is empty"):
        recalibrated_advantages(rewards, BaselineMemory())


def test_the_replay_keeps_rows_with_nonnegative_recalibrated_advantage_and_flushes():
    buffer = ReplayBuffer(capacity=4, max_staleness=100)
    # 8 groups [1, -1] (mean 0) and one [0, 0]: P50 = 0; 8 rows of reward 1 above it -> 8 > 6 fires
    add_groups(buffer, 1, {**{f"g{i}": [1.0, -1.0] for i in range(8)}, "flat": [0.0, 0.0]})
    add_groups(buffer, 2, {"low": [-0.5, -1.5]})  # P50 of [0]*9 + [-1] is 0; -0.5 enters but is below
    assert len(buffer) == 9
    replay = buffer.draw_replay(step=3)
    assert replay is not None and replay.size == 4
    assert replay.stats["kept"] == 8 and replay.stats["candidates"] == 9
    assert replay.rewards.tolist() == [1.0] * 4
    assert replay.advantages.tolist() == pytest.approx((replay.rewards - 0.0).tolist())
    assert replay.steps == [1] * 4 and replay.stats["age_mean"] == 2.0
    assert len(buffer) == 0 and buffer.replays == 1
    assert buffer.draw_replay() is None
    assert buffer.memory.size == 10  # the baselines survive the flush


def test_strict_positive_drops_rows_that_tie_the_median():
    entries = {f"g{i}": [1.0, -1.0] for i in range(4)}
    # entries: four 1s, then 0 (from "tie", mean -2) and 4 (from "up", mean 2); the means' P50 stays 0
    for strict, kept in ((False, 6), (True, 5)):
        buffer = ReplayBuffer(capacity=2, max_staleness=100, strict_positive=strict)
        add_groups(buffer, 1, entries)
        add_groups(buffer, 2, {"tie": [0.0, -4.0], "up": [4.0, 0.0]})
        replay = buffer.draw_replay()
        assert replay is not None and replay.stats["kept"] == kept


@pytest.mark.parametrize(("capacity", "groups", "size"), [(4, 7, 4), (5, 8, 4), (6, 10, 4), (8, 13, 8), (3, 5, 2)])
def test_the_replay_subset_is_the_largest_power_of_two_at_most_N(capacity, groups, size):
    buffer = ReplayBuffer(capacity=capacity, max_staleness=100)
    add_groups(buffer, 1, {f"g{i}": [1.0, -1.0] for i in range(groups)})
    replay = buffer.draw_replay()
    assert replay is not None and replay.size == size
    assert len({t.id for t in replay.trajectories}) == size  # without replacement


def test_a_triggered_replay_smaller_than_min_rows_replays_nothing_but_flushes():
    buffer = ReplayBuffer(capacity=2, max_staleness=100, min_rows=4)
    add_groups(buffer, 1, {f"g{i}": [1.0, -1.0] for i in range(4)})
    replay = buffer.draw_replay()
    assert replay is not None and replay.size == 0 and replay.stats["drawn"] == 2
    assert len(buffer) == 0


def test_the_replay_batch_carries_what_a_loss_batch_needs():
    buffer = ReplayBuffer(capacity=2, max_staleness=100)
    originals = add_groups(buffer, 1, {f"g{i}": [1.0, -1.0] for i in range(4)}, tool_turns=1)
    replay = buffer.draw_replay()
    by_id = {t.id: t for t in originals}
    for trajectory in replay.trajectories:
        original = by_id[trajectory.id]
        assert trajectory.response_ids == original.response_ids and trajectory.prompt_ids == original.prompt_ids
        assert trajectory.tool_calls == original.tool_calls
    old, mask = replay.token_tensors(width=5)
    assert old.shape == mask.shape == (2, 5)
    assert mask.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]] * 2
    assert old[:, 3:].abs().sum() == 0
    assert all(row == pytest.approx(old[i, :3].tolist()) for i, row in enumerate(replay.old_logprobs))
    metrics = replay_metrics(buffer, replay)
    assert metrics["spear/replay_event"] == 1.0 and metrics["spear/replay_rows"] == 2.0
    assert metrics["spear/replay_advantage_mean"] == pytest.approx(1.0)
    assert replay_metrics(buffer, None)["spear/replay_event"] == 0.0


# -- exact resume --------------------------------------------------------------------------------


def test_a_restored_buffer_draws_exactly_what_the_original_draws(tmp_path):
    def fill(buffer, step):
        add_groups(buffer, step, {f"s{step}g{i}": [1.0, -1.0] for i in range(9)})

    buffer = ReplayBuffer(capacity=4, max_staleness=3, seed=11)
    fill(buffer, 1)
    assert buffer.draw_replay() is not None  # advances the RNG
    fill(buffer, 2)
    state = json.loads(json.dumps(buffer.state_dict()))  # JSON-serialisable as it stands
    torch.save(buffer.state_dict(), tmp_path / "buffer.pt")
    restored = [ReplayBuffer(capacity=4, max_staleness=3, seed=999) for _ in range(2)]
    restored[0].load_state_dict(state)
    restored[1].load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=False))
    draws = []
    for candidate in (buffer, *restored):
        fill(candidate, 3)
        first = candidate.draw_replay()
        fill(candidate, 4)
        second = candidate.draw_replay()
        draws.append(([t.id for t in first.trajectories], [t.id for t in second.trajectories],
                      first.old_logprobs, candidate.memory.records, candidate.replays))
    assert draws[0] == draws[1] == draws[2]
    fresh = ReplayBuffer(capacity=4, max_staleness=3, seed=999)
    fill(fresh, 2)
    fill(fresh, 3)
    assert [t.id for t in fresh.draw_replay().trajectories] != draws[0][0]


def test_the_same_seed_draws_the_same_rows_and_another_seed_other_rows():
    def draw(seed):
        buffer = ReplayBuffer(capacity=8, max_staleness=100, seed=seed)
        add_groups(buffer, 1, {f"g{i}": [1.0, -1.0] for i in range(40)})
        return [t.id for t in buffer.draw_replay().trajectories]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


# -- the self-imitation loss ---------------------------------------------------------------------


def test_the_replay_ratio_is_taken_against_the_collection_logprobs_not_the_current_ones():
    current = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    collection = current.detach() - torch.tensor([[math.log(1.1), math.log(1.5), 0.0]])  # rho = 1.1, 1.5, 1
    advantages = torch.tensor([[2.0, 2.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = sil_loss(current, collection, advantages, mask, weight=0.5, max_response_tokens=4)
    # token 0: -A rho = -2.2; token 1: rho 1.5 is clipped at 1.28 -> -2.56, no gradient; token 2 masked
    assert loss.item() == pytest.approx(0.5 * (-2.2 - 2.56) / 4, rel=1e-5)
    loss.backward()
    assert current.grad[0].tolist() == pytest.approx([0.5 * -2.0 * 1.1 / 4, 0.0, 0.0], rel=1e-5)
    assert metrics["sil/clip_fraction"] == pytest.approx(0.5)
    assert metrics["sil/ratio_mean"] == pytest.approx((1.1 + 1.5) / 2, rel=1e-5)
    # against the current logprobs both tokens would be at rho = 1 and both get gradient
    same = current.detach().clone().requires_grad_(True)
    sil_loss(same, same.detach(), advantages, mask, weight=0.5, max_response_tokens=4)[0].backward()
    assert same.grad[0].tolist() == pytest.approx([-0.25, -0.25, 0.0])


def test_the_replay_clip_cov_band_detaches_one_high_covariance_token():
    # two tokens with centred advantage +-5 and centred logprob +-2: covariance 10 on both
    logprobs = torch.tensor([[-1.0, -5.0]], requires_grad=True)
    advantages = torch.tensor([[10.0, 0.0]])
    mask = torch.ones(1, 2)
    _, metrics = sil_loss(logprobs, logprobs.detach(), advantages, mask, 1.0, max_response_tokens=2,
                          cov_lower=2.0, cov_upper=60.0, generator=torch.Generator().manual_seed(0))
    assert metrics["sil/clip_cov_fraction"] == 0.5  # max(1, int(0.02 * 2)) of the two candidates
    loss, metrics = sil_loss(logprobs, logprobs.detach(), advantages, mask, 1.0, max_response_tokens=2,
                             cov_lower=1.0, cov_upper=5.0)
    assert metrics["sil/clip_cov_fraction"] == 0.0  # the on-policy band (1, 5) excludes 10
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([-10.0 / 2, 0.0])


def test_the_entropy_bonus_is_weighted_with_the_loss():
    logprobs = torch.zeros(1, 2)
    entropy = torch.tensor([[1.0, 3.0]])
    loss, _ = sil_loss(logprobs, logprobs, torch.zeros(1, 2), torch.ones(1, 2), 0.5, aggregation="token-mean",
                       entropy=entropy, entropy_coef=0.1)
    assert loss.item() == pytest.approx(0.5 * -0.1 * 2.0)


def test_replayed_rows_score_against_their_stored_logprobs_through_the_model(tiny_model):
    from agentrl.trainer.batching import collate, forward_response

    buffer = ReplayBuffer(capacity=2, max_staleness=100)
    trajectories, rewards = [], []
    for i in range(4):
        trajectory = Trajectory(id=f"t{i}", group_id=f"g{i}", prompt_ids=[5, 6, 7])
        trajectory.append_model_tokens([20 + i, 30, 40 + i], [0.0] * 3, turn=0, policy_version=0)
        trajectories += [trajectory, make_trajectory(f"low{i}", f"g{i}")]
        rewards += [1.0, -1.0]
    batch = collate(trajectories, pad_token_id=0)
    with torch.no_grad():
        current = forward_response(tiny_model, batch).logprobs
    collection = current - 0.1  # the collecting policy put 0.1 nats less on each token
    buffer.add(1, trajectories, torch.tensor(rewards), torch.tensor(rewards), collection, batch.loss_mask)
    replay = buffer.draw_replay()
    replay_batch = collate(replay.trajectories, pad_token_id=0)
    old, mask = replay.token_tensors(replay_batch.response_ids.shape[1])
    logprobs = forward_response(tiny_model, replay_batch).logprobs
    advantages = replay.advantages.unsqueeze(-1) * mask
    _, metrics = sil_loss(logprobs, old, advantages, mask, 1.0, max_response_tokens=8)
    assert metrics["sil/ratio_mean"] == pytest.approx(math.exp(0.1), rel=1e-4)
