"""ArCHer's utterance-level critic (Zhou et al. 2024, "ArCHer: Training Language Model Agents via
Hierarchical Multi-Turn RL"): a high-level critic over turns, trained off-policy
by TD, whose per-turn advantage drives a token-level policy gradient.

A turn is one MDP step: state ``s_k`` is the conversation up to the turn (the prompt and the
observations so far), action ``a_k`` the assistant's utterance, ``r_k`` the turn's reward (the
outcome reward lands on the last turn) and ``s_{k+1}`` the state after the next observation. Twin
heads (Fujimoto et al. 2018, clipped double Q) for both Q and V::

    y_Q = r_k + gamma (1 - d_k) min_i Vbar_i(s_{k+1})          (Q from the target V)
    y_V = min_i Qbar_i(s_k, a_k)                               (V from the target Q)
    L   = sum_i (Q_i(s_k, a_k) - y_Q)^2 + (V_i(s_k) - y_V)^2
    thetabar <- (1 - tau) thetabar + tau theta                 (Polyak-averaged target)
    A_k = min_i Q_i(s_k, a_k) - min_i V_i(s_k)                 (on every token of turn k)

Features: the heads read the policy's own last-layer hidden state, detached, rather than a
separate encoder. ``h(s_k)`` is the state before the turn's first token and ``h(s_k, a_k)`` the
state after its last token, so one causal pass gives both and the critic costs no extra forward
pass (the trainer's scoring pass returns the hidden states). A separate encoder (ArCHer uses
RoBERTa) would double the CPU cost, need its own tokenisation of a multi-turn context that can
exceed its window, and learn a representation from scratch on a few hundred transitions. Detached
features keep the TD loss out of the policy (ArCHer trains its critic separately, too). The price:
features in the replay buffer were computed by older policies, so the buffer is bounded
(``archer.buffer_size``) and favours recent data.

Everything here is pure tensors and modules; :class:`CriticLearner` bundles the heads, the target,
the optimizer, the replay buffer and the step counter, with all of it in one ``state_dict``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

Tensor = torch.Tensor
TRANSITION_KEYS = ("state", "action", "reward", "next_state", "done")


# -- features ------------------------------------------------------------------------------------


def turn_bounds(token_turns: Tensor, turns: int) -> tuple[Tensor, Tensor]:
    """``(B, K)`` first token index and one past the last token index of every assistant turn
    (from ``token_turns``, the turn index of each model token, -1 elsewhere); 0 for absent turns."""
    positions = torch.arange(token_turns.shape[1], device=token_turns.device).expand_as(token_turns)
    starts, ends = [], []
    for turn in range(turns):
        inside = token_turns == turn
        big = torch.full_like(positions, token_turns.shape[1])
        starts.append(torch.where(inside, positions, big).min(-1).values)
        ends.append(torch.where(inside, positions, torch.full_like(positions, -1)).max(-1).values + 1)
    start, end = torch.stack(starts, -1), torch.stack(ends, -1)
    present = end > 0
    return torch.where(present, start, torch.zeros_like(start)), torch.where(present, end, torch.zeros_like(end))


def turn_features(hidden: Tensor, token_turns: Tensor, turn_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``hidden`` is ``(B, T + 1, H)``, the last-layer state before response token ``t`` (and, at
    ``T``, after the last one). Returns ``(B, K, H)`` state features ``h(s_k)`` (before the turn's
    first token) and action features ``h(s_k, a_k)`` (after its last token), 0 for absent turns."""
    start, end = turn_bounds(token_turns, turn_mask.shape[1])
    index = lambda positions: positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # noqa: E731
    mask = turn_mask.unsqueeze(-1).to(torch.float32)
    state = torch.gather(hidden.float(), 1, index(start)) * mask
    action = torch.gather(hidden.float(), 1, index(end)) * mask
    return state, action


def turn_transitions(state: Tensor, action: Tensor, turn_rewards: Tensor, turn_mask: Tensor) -> dict[str, Tensor]:
    """Flatten the batch's turns into transitions ``(s_k, a_k, r_k, s_{k+1}, d_k)``; the last turn of
    a trajectory is terminal (``d = 1``, its next state unused)."""
    valid = turn_mask > 0
    next_valid = torch.zeros_like(valid)
    next_valid[:, :-1] = valid[:, 1:]
    next_state = torch.zeros_like(state)
    next_state[:, :-1] = state[:, 1:]
    rows, turns = valid.nonzero(as_tuple=True)
    return {
        "state": state[rows, turns].detach(),
        "action": action[rows, turns].detach(),
        "reward": turn_rewards[rows, turns].float(),
        "next_state": next_state[rows, turns].detach(),
        "done": (~next_valid[rows, turns]).float(),
    }


# -- the heads -----------------------------------------------------------------------------------


def _head(features: int, hidden: int) -> torch.nn.Module:
    # LayerNorm first: LM hidden states have a few very large coordinates
    return torch.nn.Sequential(torch.nn.LayerNorm(features), torch.nn.Linear(features, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 1))


class TurnCritic(torch.nn.Module):
    """Twin Q heads over ``h(s, a)`` and twin V heads over ``h(s)``."""

    def __init__(self, features: int, hidden: int = 256):
        super().__init__()
        self.q = torch.nn.ModuleList([_head(features, hidden), _head(features, hidden)])
        self.v = torch.nn.ModuleList([_head(features, hidden), _head(features, hidden)])

    def q_values(self, action: Tensor) -> tuple[Tensor, Tensor]:
        return tuple(head(action).squeeze(-1) for head in self.q)  # type: ignore[return-value]

    def v_values(self, state: Tensor) -> tuple[Tensor, Tensor]:
        return tuple(head(state).squeeze(-1) for head in self.v)  # type: ignore[return-value]


def td_loss(critic: TurnCritic, target: TurnCritic, batch: dict[str, Tensor], gamma: float) -> tuple[Tensor, dict[str, float]]:
    """ArCHer's TD loss on a minibatch of transitions, targets from the target network."""
    with torch.no_grad():
        next_v = torch.minimum(*target.v_values(batch["next_state"]))
        q_target = batch["reward"] + gamma * (1.0 - batch["done"]) * next_v
        v_target = torch.minimum(*target.q_values(batch["action"]))
    q1, q2 = critic.q_values(batch["action"])
    v1, v2 = critic.v_values(batch["state"])
    q_loss = ((q1 - q_target) ** 2).mean() + ((q2 - q_target) ** 2).mean()
    v_loss = ((v1 - v_target) ** 2).mean() + ((v2 - v_target) ** 2).mean()
    return q_loss + v_loss, {"critic/q_loss": float(q_loss.detach()), "critic/v_loss": float(v_loss.detach()),
                             "critic/q_mean": float(torch.minimum(q1, q2).detach().mean())}


@torch.no_grad()
def polyak_update(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """``thetabar <- (1 - tau) thetabar + tau theta``."""
    for target_parameter, parameter in zip(target.parameters(), online.parameters()):
        target_parameter.lerp_(parameter, tau)


@torch.no_grad()
def archer_advantages(critic: TurnCritic, state: Tensor, action: Tensor, turn_mask: Tensor) -> Tensor:
    """ArCHer's turn advantage::

        A_k = min_i Q_i(s_k, a_k) - min_i V_i(s_k)

    ``state``/``action`` are ``(B, K, H)``; returns ``(B, K)``, 0 on absent turns. Spread it over
    each turn's tokens with :func:`agentrl.algos.advantages.spread_turn_values`.
    """
    advantage = torch.minimum(*critic.q_values(action)) - torch.minimum(*critic.v_values(state))
    return advantage * turn_mask.to(advantage.dtype)


# -- learner state -------------------------------------------------------------------------------


class CriticLearner:
    """The critic, its target, its optimizer, a FIFO replay buffer of transitions and counters.
    The heads and their optimizer state live on ``device``; the buffer stays on the CPU (it outlives
    many steps) and each TD minibatch is moved to the heads."""

    def __init__(self, features: int, hidden: int = 256, lr: float = 1e-4, gamma: float = 0.95, tau: float = 0.1,
                 batch_size: int = 64, buffer_size: int = 4096, seed: int = 0, device: torch.device | str = "cpu"):
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # the heads' initialisation is a function of the seed alone (on any device)
        try:
            self.critic = TurnCritic(features, hidden).to(device)
        finally:
            torch.random.set_rng_state(torch_state)
        self.device = torch.device(device)
        self.target = copy.deepcopy(self.critic).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.gamma, self.tau, self.batch_size, self.buffer_size = gamma, tau, batch_size, buffer_size
        self.buffer = {key: torch.zeros((0, features) if key in ("state", "action", "next_state") else (0,))
                       for key in TRANSITION_KEYS}
        self.updates = 0  # TD gradient steps taken
        self.collections = 0  # batches of transitions added (RL steps seen)

    def add(self, transitions: dict[str, Tensor]) -> None:
        for key in TRANSITION_KEYS:
            self.buffer[key] = torch.cat([self.buffer[key], transitions[key].float().cpu()])[-self.buffer_size:]
        self.collections += 1

    def update(self, steps: int, generator: torch.Generator | None = None) -> dict[str, float]:
        """``steps`` TD updates on minibatches drawn uniformly from the buffer, each followed by a
        Polyak step of the target. Returns the mean of the logged quantities."""
        size = int(self.buffer["reward"].shape[0])
        sums: dict[str, float] = {}
        if size == 0 or steps == 0:
            return {}
        self.critic.train()
        for _ in range(steps):
            rows = torch.randint(size, (min(self.batch_size, size),), generator=generator)
            minibatch = {key: value[rows].to(self.device) for key, value in self.buffer.items()}
            loss, logged = td_loss(self.critic, self.target, minibatch, self.gamma)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), 1.0)
            if torch.isfinite(grad_norm):
                self.optimizer.step()
                polyak_update(self.target, self.critic, self.tau)
            self.updates += 1
            for key, value in logged.items():
                sums[key] = sums.get(key, 0.0) + value
        self.critic.eval()
        return {**{key: value / steps for key, value in sums.items()}, "critic/buffer": float(size)}

    def advantages(self, state: Tensor, action: Tensor, turn_mask: Tensor) -> Tensor:
        return archer_advantages(self.critic, state.float(), action.float(), turn_mask)

    def state_dict(self) -> dict[str, Any]:
        """A copy (the optimizer's own state_dict shares its moment tensors with the live ones)."""
        return copy.deepcopy({"critic": self.critic.state_dict(), "target": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "buffer": dict(self.buffer),
                "updates": self.updates, "collections": self.collections})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.critic.load_state_dict(state["critic"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer = {key: value.clone() for key, value in state["buffer"].items()}
        self.updates, self.collections = int(state["updates"]), int(state["collections"])
