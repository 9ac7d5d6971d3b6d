"""The ArCHer critic's parts: features at turn boundaries, transitions, TD targets, Polyak
averaging, and a state that round-trips exactly."""

import torch

from agentrl.algos.critic import (
    CriticLearner,
    TurnCritic,
    polyak_update,
    td_loss,
    turn_bounds,
    turn_features,
    turn_transitions,
)

# response: turn 0 on tokens 0-1, an observation on 2-3, turn 1 on 4; row 1 has one turn (0-2)
TOKEN_TURNS = torch.tensor([[0, 0, -1, -1, 1], [0, 0, 0, -1, -1]])
TURN_MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def test_turn_bounds_and_features_are_the_states_before_and_after_each_turn():
    start, end = turn_bounds(TOKEN_TURNS, 2)
    assert start.tolist() == [[0, 4], [0, 0]] and end.tolist() == [[2, 5], [3, 0]]
    hidden = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1)  # value = row * 6 + position
    state, action = turn_features(hidden, TOKEN_TURNS, TURN_MASK)
    assert state[..., 0].tolist() == [[0.0, 4.0], [6.0, 0.0]]
    assert action[..., 0].tolist() == [[2.0, 5.0], [9.0, 0.0]]


def test_transitions_link_each_turn_to_the_next_state_and_mark_the_last_terminal():
    state = torch.tensor([[[1.0], [2.0]], [[3.0], [0.0]]])
    action = state + 10
    transitions = turn_transitions(state, action, torch.tensor([[0.0, 1.0], [0.5, 0.0]]), TURN_MASK)
    assert transitions["state"][:, 0].tolist() == [1.0, 2.0, 3.0]
    assert transitions["next_state"][:, 0].tolist() == [2.0, 0.0, 0.0]
    assert transitions["done"].tolist() == [0.0, 1.0, 1.0]
    assert transitions["reward"].tolist() == [0.0, 1.0, 0.5]


def test_td_targets_use_the_min_of_the_target_twins():
    critic, target = TurnCritic(2, 4), TurnCritic(2, 4)
    batch = {"state": torch.zeros(1, 2), "action": torch.ones(1, 2), "reward": torch.tensor([1.0]),
             "next_state": torch.full((1, 2), 2.0), "done": torch.tensor([0.0])}
    loss, _ = td_loss(critic, target, batch, gamma=0.5)
    with torch.no_grad():
        q_target = 1.0 + 0.5 * torch.minimum(*target.v_values(batch["next_state"]))
        v_target = torch.minimum(*target.q_values(batch["action"]))
        q1, q2 = critic.q_values(batch["action"])
        v1, v2 = critic.v_values(batch["state"])
        expected = (q1 - q_target) ** 2 + (q2 - q_target) ** 2 + (v1 - v_target) ** 2 + (v2 - v_target) ** 2
    assert torch.allclose(loss, expected.sum())


def test_polyak_moves_the_target_a_fraction_tau_towards_the_online_weights():
    online, target = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    before = target.weight.detach().clone()
    polyak_update(target, online, 0.25)
    assert torch.allclose(target.weight, 0.75 * before + 0.25 * online.weight)


def test_learner_state_round_trips_exactly():
    generator = torch.Generator().manual_seed(1)
    transitions = {"state": torch.randn(6, 3, generator=generator), "action": torch.randn(6, 3, generator=generator),
                   "reward": torch.rand(6, generator=generator), "next_state": torch.randn(6, 3, generator=generator),
                   "done": torch.tensor([0.0, 1.0] * 3)}
    first = CriticLearner(3, hidden=8, batch_size=4, seed=0)
    first.add(transitions)
    first.update(3, torch.Generator().manual_seed(0))
    second = CriticLearner(3, hidden=8, batch_size=4, seed=5)
    second.load_state_dict(first.state_dict())
    first.update(2, torch.Generator().manual_seed(9))
    second.update(2, torch.Generator().manual_seed(9))
    for a, b in zip([*first.critic.parameters(), *first.target.parameters()],
                    [*second.critic.parameters(), *second.target.parameters()]):
        assert torch.equal(a, b)
    assert (second.updates, second.collections) == (5, 1)


def test_buffer_keeps_the_newest_transitions():
    learner = CriticLearner(1, hidden=4, buffer_size=3)
    for value in range(4):
        learner.add({"state": torch.full((1, 1), float(value)), "action": torch.zeros(1, 1), "reward": torch.zeros(1),
                     "next_state": torch.zeros(1, 1), "done": torch.ones(1)})
    assert learner.buffer["state"][:, 0].tolist() == [1.0, 2.0, 3.0]
