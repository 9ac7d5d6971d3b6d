"""Every advantage estimator against values computed by hand."""

import math

import pytest
import torch

from agentrl.algos.advantages import (
    broadcast_to_tokens,
    discounted_turn_returns,
    dr_grpo_advantages,
    gae_advantages,
    grpo_advantages,
    last_token_rewards,
    overlong_filter,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    spread_turn_values,
    turn_grpo_advantages,
    varied_groups_mask,
)

REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 5.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 2])


def close(actual, expected, tol=1e-5):
    assert torch.allclose(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=tol), (actual, expected)


def test_grpo_normalises_by_the_unbiased_group_std():
    # group 0: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    close(grpo_advantages(REWARDS, GROUPS), [1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0])


def test_grpo_without_std_and_dr_grpo_only_subtract_the_group_mean():
    expected = [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0]
    close(grpo_advantages(REWARDS, GROUPS, norm_std=False), expected)
    close(dr_grpo_advantages(REWARDS, GROUPS), expected)


def test_group_ids_need_not_be_contiguous_or_sorted():
    rewards = torch.tensor([1.0, 3.0, 0.0, 2.0])
    groups = torch.tensor([7, 3, 7, 3])
    close(dr_grpo_advantages(rewards, groups), [0.5, 0.5, -0.5, -0.5])


def test_rloo_uses_the_leave_one_out_mean():
    # A_0 = 1 - (0 + 0 + 0) / 3 = 1; A_1 = 0 - (1 + 0 + 0) / 3 = -1/3
    close(rloo_advantages(REWARDS, GROUPS), [1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])


def test_last_token_rewards_skip_trailing_observation_tokens():
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    close(last_token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask), [[0, 0, 0, 1, 0], [2, 0, 0, 0, 0], [0, 0, 0, 0, 0]])


def test_reinforce_pp_discounts_over_model_tokens_and_whitens_over_the_batch():
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0]])
    advantages = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), mask, gamma=0.5)
    # returns row 0: t3 = 1, t1 = 0.5 * 1 (the observation at t2 is not a step), t0 = 0.25; row 1: 0
    valid = [0.25, 0.5, 1.0, 0.0, 0.0]
    mean = sum(valid) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in valid) / 4)
    expected = [[(0.25 - mean) / std, (0.5 - mean) / std, 0.0, (1.0 - mean) / std], [-mean / std, -mean / std, 0.0, 0.0]]
    close(advantages, expected)


def test_reinforce_pp_puts_the_kl_penalty_into_the_token_rewards():
    mask = torch.tensor([[1, 1], [1, 1]])
    kl = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    advantages = reinforce_pp_advantages(torch.tensor([1.0, 1.0]), mask, gamma=1.0, token_kl=kl, kl_coef=0.5)
    # returns: row 0 [0.5, 1], row 1 [1, 1]; mean 0.875, std sqrt((0.375^2 + 3 * 0.125^2) / 3) = 0.25
    close(advantages, [[-1.5, 0.5], [0.5, 0.5]])


def test_reinforce_pp_baseline_centres_by_group_then_whitens_over_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    advantages = reinforce_pp_baseline_advantages(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0, 0, 1]), mask)
    # centred: 0.5, -0.5, 0 -> tokens [0.5, 0.5, -0.5, 0, 0, 0]: mean 1/12
    valid = [0.5, 0.5, -0.5, 0.0, 0.0, 0.0]
    mean = sum(valid) / 6
    std = math.sqrt(sum((v - mean) ** 2 for v in valid) / 5)
    a, b, c = (0.5 - mean) / std, (-0.5 - mean) / std, -mean / std
    close(advantages, [[a, a, 0], [b, 0, 0], [c, c, c]])


def test_gae_skips_observation_tokens_and_returns_value_targets():
    values = torch.tensor([[0.5, 0.2, 9.0, 0.4]])
    mask = torch.tensor([[1, 1, 0, 1]])
    token_rewards = last_token_rewards(torch.tensor([1.0]), mask)
    advantages, returns = gae_advantages(token_rewards, values, mask, gamma=1.0, lam=0.5)
    # t3: 1 - 0.4 = 0.6; t1: 0.4 - 0.2 + 0.5 * 0.6 = 0.5; t0: 0.2 - 0.5 + 0.5 * 0.5 = -0.05
    close(advantages, [[-0.05, 0.5, 0.0, 0.6]])
    close(returns, [[0.45, 0.7, 0.0, 1.0]])


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    values = torch.tensor([[0.1, 0.2, 0.3]])
    mask = torch.ones(1, 3)
    advantages, _ = gae_advantages(last_token_rewards(torch.tensor([2.0]), mask), values, mask)
    close(advantages, [[1.9, 1.8, 1.7]])


def test_gae_discounts_with_gamma():
    values = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    advantages, _ = gae_advantages(last_token_rewards(torch.tensor([1.0]), mask), values, mask, gamma=0.9, lam=1.0)
    close(advantages, [[0.9, 1.0]])


def test_turn_returns_are_discounted_sums_of_later_turn_rewards():
    turn_rewards = torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.0, 0.0]])
    turn_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # row 0: G2 = 2, G1 = 1 + 0.5 * 2 = 2, G0 = 0.5 + 0.5 * 2 = 1.5
    close(discounted_turn_returns(turn_rewards, turn_mask, gamma=0.5), [[1.5, 2.0, 2.0], [1.0, 0.0, 0.0]])


def test_turn_grpo_credits_each_turn_against_that_turns_group_baseline():
    returns = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.5], [2.0, 1.0], [0.0, 3.0]])
    turn_mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1]])
    advantages = turn_grpo_advantages(returns, turn_mask, torch.tensor([0, 0, 1, 2, 2]))
    # group 0, turn 0: [1, 0], mean 0.5, std sqrt(0.5); turn 1 has one member (row 1 ended) -> 0.
    # group 1 has one sample -> 0. group 2, turn 0: [2, 0] -> +-1/sqrt(2); turn 1: [1, 3] -> -+1/sqrt(2)
    s = math.sqrt(0.5) + 1e-6
    t = 1 / (math.sqrt(2) + 1e-6)
    close(advantages, [[0.5 / s, 0.0], [-0.5 / s, 0.0], [0.0, 0.0], [t, -t], [-t, t]])


def test_turn_grpo_gives_a_uniformly_successful_group_zero_advantage():
    # outcome-only reward on turn 2 with turn_gamma 0.9: G = [0.9, 1.0] for every sample. A baseline
    # taken from G_0 alone gave the last turn (1.0 - 0.9) / 1e-6 = 1e5.
    returns = discounted_turn_returns(torch.tensor([[0.0, 1.0]] * 4), torch.ones(4, 2), gamma=0.9)
    close(returns, [[0.9, 1.0]] * 4)
    close(turn_grpo_advantages(returns, torch.ones(4, 2), torch.zeros(4, dtype=torch.long)), [[0.0, 0.0]] * 4)


def test_turn_grpo_with_env_turn_rewards_uses_per_turn_statistics():
    # every sample answers correctly on turn 2; the first turns earned different env rewards
    returns = discounted_turn_returns(torch.tensor([[0.1, 1.0], [0.2, 1.0], [0.1, 1.0]]), torch.ones(3, 2))
    advantages = turn_grpo_advantages(returns, torch.ones(3, 2), torch.zeros(3, dtype=torch.long))
    # turn 0: [1.1, 1.2, 1.1], mean 1.1333, std sqrt(1/300); turn 1 ties -> 0 (it was -2.31 before)
    std = math.sqrt(1 / 300) + 1e-6
    close(advantages, [[-0.1 / 3 / std, 0.0], [0.2 / 3 / std, 0.0], [-0.1 / 3 / std, 0.0]], tol=1e-4)


def test_turn_grpo_with_only_an_outcome_reward_equals_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0])
    turn_rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    turn_mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]])
    returns = discounted_turn_returns(turn_rewards, turn_mask, gamma=1.0)
    advantages = turn_grpo_advantages(returns, turn_mask, groups)
    close(advantages[:, 0], grpo_advantages(rewards, groups).tolist())
    # the second turn is compared only with the samples that reached it
    close(advantages[:2, 1], grpo_advantages(rewards[:2], groups[:2]).tolist())
    close(advantages[2:, 1], [0.0, 0.0])


def test_spread_turn_values_gives_each_model_token_its_turn_value():
    token_turns = torch.tensor([[0, 0, -1, 1, 1, -1]])
    close(spread_turn_values(torch.tensor([[2.0, 3.0]]), token_turns), [[2, 2, 0, 3, 3, 0]])


def test_broadcast_to_tokens_respects_the_loss_mask():
    close(broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1, 0, 1], [0, 1, 1]])), [[2, 0, 2], [0, -1, -1]])


def test_dynamic_sampling_drops_groups_whose_rewards_do_not_vary():
    keep = varied_groups_mask(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5]), torch.tensor([0, 0, 1, 1, 2]))
    assert keep.tolist() == [False, False, True, True, False]


def test_overlong_filter_masks_truncated_trajectories():
    mask = torch.tensor([[1, 1], [1, 0]])
    assert overlong_filter(mask, torch.tensor([True, False])).tolist() == [[0, 0], [1, 0]]


@pytest.mark.parametrize("estimator", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_sequence_estimators_sum_to_zero_within_a_group(estimator):
    rewards = torch.rand(12, generator=torch.Generator().manual_seed(0))
    groups = torch.arange(12) // 4
    advantages = estimator(rewards, groups)
    for group in range(3):
        assert abs(float(advantages[groups == group].sum())) < 1e-5
