"""Credit assignment on a scripted two-turn task where only the last turn decides the reward.

Turn 0 searches with action A or B (each is followed by its own observation); turn 1 answers right
or wrong; the reward is 1 for a right answer, whatever the search. Every combination appears twice
in one group of 8. A sound hierarchical estimator gives the deciding (last) turn the larger
advantage; trajectory-level GRPO gives both turns the same one.
"""

import itertools

import pytest
import torch

from agentrl.algos import advantages as adv
from agentrl.algos.critic import CriticLearner, turn_features, turn_transitions
from agentrl.trainer.batching import collate
from agentrl.trajectory import Trajectory

PROMPT = [1, 2, 3]
SEARCH = {"A": [10, 11], "B": [12, 13]}
OBSERVATION = {"A": [20, 21, 22], "B": [23, 24, 25]}
ANSWER = {"right": [30, 31], "wrong": [32, 33]}


def toy_batch():
    trajectories = []
    combos = list(itertools.product("AB", ["right", "wrong"])) * 2
    for index, (search, answer) in enumerate(combos):
        trajectory = Trajectory(id=f"toy/{index}", group_id="toy", prompt_ids=list(PROMPT))
        trajectory.append_model_tokens(SEARCH[search], [0.0, 0.0], 0, 0)
        trajectory.append_observation_tokens(OBSERVATION[search], 0)
        trajectory.append_model_tokens(ANSWER[answer], [0.0, 0.0], 1, 0)
        trajectory.reward = float(answer == "right")
        trajectories.append(trajectory)
    return collate(trajectories, pad_token_id=0), combos


def per_turn_token_advantage(token_advantages, batch):
    """Mean |advantage| over the tokens of turn 0 and of turn 1."""
    magnitude = token_advantages.abs()
    return [float(magnitude[batch.token_turns == turn].mean()) for turn in (0, 1)]


def test_grpo_gives_both_turns_the_same_advantage():
    batch, _ = toy_batch()
    tokens = adv.broadcast_to_tokens(adv.grpo_advantages(batch.rewards, batch.group_ids), batch.loss_mask)
    for row in range(batch.size):
        turn0 = tokens[row][batch.token_turns[row] == 0]
        turn1 = tokens[row][batch.token_turns[row] == 1]
        assert torch.allclose(turn0, turn1[:1].expand_as(turn0))
        assert abs(float(turn0[0])) > 0.5


def test_turn_grpo_gives_the_deciding_turn_the_larger_advantage():
    # Without the std division (with it, each turn column of an outcome-only reward is a rescaled
    # copy of the others and the normalised values coincide exactly).
    batch, _ = toy_batch()
    returns = adv.discounted_turn_returns(batch.turn_rewards, batch.turn_mask, gamma=0.5)
    per_turn = adv.turn_grpo_advantages(returns, batch.turn_mask, batch.group_ids, norm_std=False)
    tokens = adv.spread_turn_values(per_turn, batch.token_turns) * batch.loss_mask
    first, last = per_turn_token_advantage(tokens, batch)
    assert last == pytest.approx(0.5) and first == pytest.approx(0.25)


def test_gigpo_gives_the_deciding_turn_the_larger_advantage():
    batch, _ = toy_batch()
    returns = adv.discounted_turn_returns(batch.turn_rewards, batch.turn_mask, gamma=0.5)
    per_turn = adv.gigpo_advantages(batch.rewards, batch.group_ids, returns, batch.turn_mask, batch.anchor_keys,
                                    step_weight=1.0, norm_std=False)
    tokens = adv.spread_turn_values(per_turn, batch.token_turns) * batch.loss_mask
    first, last = per_turn_token_advantage(tokens, batch)
    # episode +-0.5 everywhere; step: turn 0 (one anchor, the prompt) 0.5 * (R - 0.5), turn 1 (anchors
    # O_A and O_B, half right each) R - 0.5
    assert first == pytest.approx(0.75) and last == pytest.approx(1.0)


def perfect_encoder_hidden(batch, size=16, seed=0):
    """``(B, T + 1, H)``: one fixed random vector per distinct token prefix, a stand-in for a policy
    whose hidden state identifies the conversation so far."""
    generator = torch.Generator().manual_seed(seed)
    vectors: dict[tuple[int, ...], torch.Tensor] = {}
    hidden = torch.zeros(batch.size, batch.response_ids.shape[1] + 1, size)
    for row in range(batch.size):
        length = int(batch.response_lengths[row])
        for t in range(length + 1):
            prefix = tuple(PROMPT) + tuple(batch.response_ids[row, :t].tolist())
            if prefix not in vectors:
                vectors[prefix] = torch.randn(size, generator=generator)
            hidden[row, t] = vectors[prefix]
    return hidden


def test_archer_critic_trained_by_td_gives_the_deciding_turn_the_larger_advantage():
    batch, combos = toy_batch()
    state, action = turn_features(perfect_encoder_hidden(batch), batch.token_turns, batch.turn_mask)
    learner = CriticLearner(features=16, hidden=32, lr=3e-3, gamma=0.9, tau=0.1, batch_size=16, seed=0)
    learner.add(turn_transitions(state, action, batch.turn_rewards, batch.turn_mask))
    metrics = learner.update(400, torch.Generator().manual_seed(0))
    assert metrics["critic/q_loss"] < 0.1
    per_turn = learner.advantages(state, action, batch.turn_mask)
    right = torch.tensor([answer == "right" for _, answer in combos])
    assert (per_turn[right, 1] > 0.3).all() and (per_turn[~right, 1] < -0.3).all()
    assert per_turn[:, 0].abs().max() < 0.15  # the search did not matter
    tokens = adv.spread_turn_values(per_turn, batch.token_turns) * batch.loss_mask
    first, last = per_turn_token_advantage(tokens, batch)
    assert last > 3 * first
