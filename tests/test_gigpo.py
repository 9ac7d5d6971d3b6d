"""GiGPO against values computed by hand, and the anchor-state keys it groups turns by."""

import math

import torch

from agentrl.algos.advantages import discounted_turn_returns, gigpo_advantages
from agentrl.trainer.batching import collate
from agentrl.trajectory import Trajectory


def close(actual, expected, tol=1e-5):
    assert torch.allclose(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=tol), (actual, expected)


def test_gigpo_adds_a_step_advantage_within_anchor_state_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    turn_mask = torch.ones(6, 2)
    returns = discounted_turn_returns(torch.stack([torch.zeros(6), rewards], -1), turn_mask, gamma=1.0)
    # turn 0 answers the prompt (one key per task); turn 1 answers observation 20 or 30. Rows 4 and 5
    # see observation 20 too, but belong to another task group: they must not join rows 0 and 1.
    keys = torch.tensor([[7, 20], [7, 20], [7, 30], [7, 30], [8, 20], [8, 20]])
    advantages = gigpo_advantages(rewards, groups, returns, turn_mask, keys, step_weight=0.5)
    # episode, group 0: rewards [1, 0, 1, 1], mean 0.75, std 0.5 -> [0.5, -1.5, 0.5, 0.5];
    # group 1: [0, 1] -> -+1/sqrt(2). Step, turn 0: the same groups and returns as the episode;
    # turn 1: anchor (0, 20) returns [1, 0] -> +-1/sqrt(2); (0, 30) ties -> 0; (1, 20) = group 1.
    s = 0.5 / math.sqrt(0.5)
    episode = [0.5, -1.5, 0.5, 0.5, -s, s]
    step1 = [s, -s, 0.0, 0.0, -s, s]
    expected = [[a + 0.5 * a, a + 0.5 * b] for a, b in zip(episode, step1)]
    close(advantages, expected, tol=1e-4)


def test_gigpo_without_std_and_with_a_discount():
    rewards = torch.tensor([1.0, 0.0])
    turn_mask = torch.ones(2, 2)
    returns = discounted_turn_returns(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), turn_mask, gamma=0.9)
    keys = torch.tensor([[1, 5], [1, 6]])  # different observations before turn 1: singleton step groups
    advantages = gigpo_advantages(rewards, torch.zeros(2, dtype=torch.long), returns, turn_mask, keys,
                                  step_weight=1.0, norm_std=False)
    # episode +-0.5; turn 0 step: returns [0.9, 0] -> +-0.45; turn 1 step groups of one -> 0
    close(advantages, [[0.95, 0.5], [-0.95, -0.5]])


def trajectory(observation, answer):
    t = Trajectory(id="x", group_id="g", prompt_ids=[1, 2, 3])
    t.append_model_tokens([10, 11], [0.0, 0.0], 0, 0)
    t.append_observation_tokens(observation, 0)
    t.append_model_tokens(answer, [0.0] * len(answer), 1, 0)
    t.reward = 1.0
    return t


def test_anchor_keys_are_equal_exactly_when_the_preceding_observation_is():
    batch = collate([trajectory([20, 21], [30]), trajectory([20, 21], [31, 32]), trajectory([22], [30])], pad_token_id=0)
    keys = batch.anchor_keys
    assert keys[0, 0] == keys[1, 0] == keys[2, 0]  # the same prompt
    assert keys[0, 1] == keys[1, 1] and keys[0, 1] != keys[2, 1]
    assert keys[0, 0] != keys[0, 1]
    assert torch.equal(batch.select([2, 0]).anchor_keys, keys[[2, 0]])  # per-turn, not trimmed as tokens
