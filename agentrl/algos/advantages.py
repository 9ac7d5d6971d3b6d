"""Advantage estimators: pure functions over tensors.

Shapes: ``rewards`` is ``(B,)`` (one scalar per trajectory); ``group_ids`` is ``(B,)`` integer ids,
equal for the samples of one prompt; ``loss_mask`` is ``(B, T)`` over response tokens, 1 where the
policy sampled the token and 0 for observation and template tokens. Sequence-level estimators
return ``(B,)``; :func:`broadcast_to_tokens` spreads them over the model tokens. Token-level
estimators (REINFORCE++, GAE, turn-level credit) return ``(B, T)``, already zero where masked.

Multi-turn trajectories interleave model tokens with observation tokens. The token-level recursions
(discounted returns, GAE) run over the model tokens only: an observation span is not a step of the
policy, so the step after the last token of turn k is the first token of turn k+1.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


# -- group statistics ----------------------------------------------------------------------------


def group_mean_std(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-element mean, unbiased std and size of the element's group (std is 0 for size 1)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    values = values.double()
    count = values.new_zeros(groups).index_add_(0, inverse, torch.ones_like(values))
    total = values.new_zeros(groups).index_add_(0, inverse, values)
    mean = total / count
    squared = values.new_zeros(groups).index_add_(0, inverse, (values - mean[inverse]) ** 2)
    variance = torch.where(count > 1, squared / (count - 1).clamp(min=1), torch.zeros_like(squared))
    return mean[inverse], variance.sqrt()[inverse], count[inverse]


def grpo_advantages(rewards: Tensor, group_ids: Tensor, norm_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, eq. 3 outcome supervision)::

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    with the unbiased std of the group. ``norm_std=False`` drops the division (Dr.GRPO). A group of
    one sample has no baseline and gets advantage 0.
    """
    mean, std, count = group_mean_std(rewards, group_ids)
    advantages = rewards.double() - mean
    if norm_std:
        advantages = advantages / (std + eps)
    return torch.where(count > 1, advantages, torch.zeros_like(advantages)).to(rewards.dtype)


def dr_grpo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", eq. 3)::

        A_i = r_i - mean(r_group)

    The std division biases updates towards too-easy and too-hard prompts; Dr.GRPO removes it (and
    the per-sequence length normaliser: use the ``dr-grpo`` loss aggregation with it).
    """
    return grpo_advantages(rewards, group_ids, norm_std=False)


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics", eq. 5), leave-one-out baseline::

        A_i = r_i - 1/(n-1) * sum_{j != i} r_j  =  n/(n-1) * (r_i - mean(r_group))
    """
    mean, _, count = group_mean_std(rewards, group_ids)
    advantages = (rewards.double() - mean) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, advantages, torch.zeros_like(advantages)).to(rewards.dtype)


# -- token-level helpers -------------------------------------------------------------------------


def broadcast_to_tokens(sequence_values: Tensor, loss_mask: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, T)``: every model token of a trajectory gets its trajectory's value."""
    return sequence_values.unsqueeze(-1).to(torch.float32) * loss_mask.to(torch.float32)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / std`` over the masked entries of the whole batch (unbiased std); 0 elsewhere."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean = (values * mask).sum() / count.clamp(min=1)
    variance = (((values - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(variance + eps) * mask


def last_token_rewards(rewards: Tensor, loss_mask: Tensor) -> Tensor:
    """``(B, T)`` with each trajectory's reward on its last model token and 0 elsewhere."""
    mask = loss_mask.to(torch.float32)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values
    token_rewards = torch.zeros_like(mask)
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    token_rewards[rows, last[has_tokens]] = rewards[has_tokens].to(torch.float32)
    return token_rewards


def discounted_returns(token_rewards: Tensor, loss_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = r_t + gamma * G_{t'}`` where ``t'`` is the next model token (observations skipped)."""
    mask = loss_mask.to(token_rewards.dtype)
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        updated = token_rewards[:, t] + gamma * running
        running = torch.where(mask[:, t] > 0, updated, running)
        returns[:, t] = updated * mask[:, t]
    return returns


# -- REINFORCE++ ---------------------------------------------------------------------------------


def reinforce_pp_advantages(
    rewards: Tensor, loss_mask: Tensor, gamma: float = 1.0, token_kl: Tensor | None = None, kl_coef: float = 0.0
) -> Tensor:
    """REINFORCE++ (Hu 2025, "REINFORCE++", eqs. 4-6): the KL penalty is part of the token reward,
    returns are discounted over model tokens, and advantages are normalised over the whole batch::

        r_t = -beta * KL_t  (+ r on the last token),   G_t = sum_{k>=t} gamma^{k-t} r_k,
        A_t = (G_t - mean_batch(G)) / std_batch(G)
    """
    token_rewards = last_token_rewards(rewards, loss_mask)
    if token_kl is not None and kl_coef:
        token_rewards = token_rewards - kl_coef * token_kl.to(token_rewards.dtype) * loss_mask
    returns = discounted_returns(token_rewards, loss_mask, gamma)
    return masked_whiten(returns, loss_mask)


def reinforce_pp_baseline_advantages(rewards: Tensor, group_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """REINFORCE++-baseline (Hu 2025, sec. 3.2): subtract the group mean reward, then normalise
    over every model token of the batch::

        A_{i,t} = whiten_batch(r_i - mean(r_group))
    """
    mean, _, _ = group_mean_std(rewards, group_ids)
    centered = (rewards.double() - mean).to(torch.float32)
    return masked_whiten(broadcast_to_tokens(centered, loss_mask), loss_mask)


# -- GAE -----------------------------------------------------------------------------------------


def gae_advantages(
    token_rewards: Tensor, values: Tensor, loss_mask: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16) for PPO with a value head::

        delta_t = r_t + gamma * V(s_{t'}) - V(s_t),   A_t = delta_t + gamma * lam * A_{t'}

    where ``t'`` is the next model token (0 past the end). Returns ``(advantages, returns)`` with
    ``returns = A + V`` as the value target; both 0 on masked tokens.
    """
    mask = loss_mask.to(values.dtype)
    values = values.detach()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        valid = mask[:, t] > 0
        next_value = torch.where(valid, values[:, t], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
        advantages[:, t] = advantage * mask[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


# -- turn-level credit ---------------------------------------------------------------------------


def discounted_turn_returns(turn_rewards: Tensor, turn_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Per-turn returns ``G_k = sum_{j>=k} gamma^{j-k} r_j`` over a trajectory's turns.

    ``turn_rewards`` and ``turn_mask`` are ``(B, K)``; turns past a trajectory's end are masked.
    """
    return discounted_returns(turn_rewards, turn_mask, gamma)


def turn_grpo_advantages(
    turn_returns: Tensor, turn_mask: Tensor, group_ids: Tensor, norm_std: bool = True, eps: float = 1e-6,
    tolerance: float = 1e-8,
) -> Tensor:
    """Turn-level credit with a per-turn group baseline (MT-GRPO, Zeng et al. 2025, "Reinforcing
    Multi-Turn Reasoning in LLM Agents via Turn-Level Credit Assignment")::

        A_{i,k} = (G_{i,k} - mean_{j in g: k < K_j} G_{j,k}) / (std_{j in g: k < K_j} G_{j,k} + eps)

    Each turn's return-to-go is compared with the same turn's returns of the other group members
    that reached it, which estimates ``E[G_k]``; a baseline from ``G_0`` would not, and divided by a
    zero std it gave 1e5 advantages to uniformly successful groups. A turn column with fewer than
    two members, or (``norm_std``) whose returns tie within ``tolerance``, gets 0. With the reward
    only at the end and ``gamma = 1`` every column is GRPO on the outcome. Returns ``(B, K)``.
    """
    advantages = torch.zeros(turn_returns.shape, dtype=torch.float64, device=turn_returns.device)
    for turn in range(turn_returns.shape[1]):
        rows = (turn_mask[:, turn] > 0).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        values = turn_returns[rows, turn].double()
        mean, std, count = group_mean_std(values, group_ids[rows])
        centred = values - mean
        if norm_std:
            centred = torch.where(std > tolerance, centred / (std + eps), torch.zeros_like(centred))
        advantages[rows, turn] = torch.where(count > 1, centred, torch.zeros_like(centred))
    return (advantages * turn_mask).to(turn_returns.dtype)


def gigpo_advantages(
    rewards: Tensor, group_ids: Tensor, turn_returns: Tensor, turn_mask: Tensor, anchor_keys: Tensor,
    step_weight: float = 1.0, norm_std: bool = True, eps: float = 1e-6,
) -> Tensor:
    """GiGPO (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training"): an
    episode-level group advantage plus a step-level one within anchor-state groups::

        A^E(tau_i)  = (R(tau_i) - mean_j R(tau_j)) / F_norm
        G^S(s~)     = {(a_t^j, R_t^j) : s_t^j = s~, j in the group},  R_t^j = sum_k gamma^k r_{t+k}^j
        A^S(a_t^i)  = (R_t^i - mean_{G^S(s~)} R) / F_norm
        A(a_t^i)    = A^E(tau_i) + omega * A^S(a_t^i)

    with ``F_norm`` the (unbiased) std of the group, or 1 with ``norm_std=False``. ``turn_returns``
    ``(B, K)`` are the discounted returns ``R_t`` (see :func:`discounted_turn_returns`);
    ``anchor_keys`` ``(B, K)`` identify each turn's state (a hash of the observation it answers),
    so turns of one task group whose keys agree form a step group. A step group of one turn has no
    baseline and adds 0. Returns ``(B, K)``.
    """
    episode = grpo_advantages(rewards.double(), group_ids, norm_std, eps)
    rows, turns = (turn_mask > 0).nonzero(as_tuple=True)
    step = torch.zeros(turn_returns.shape, dtype=torch.float64, device=turn_returns.device)
    if rows.numel():
        keys = torch.stack([group_ids[rows].long(), anchor_keys[rows, turns].long()], dim=-1)
        _, step_groups = torch.unique(keys, dim=0, return_inverse=True)
        step[rows, turns] = grpo_advantages(turn_returns[rows, turns].double(), step_groups, norm_std, eps)
    return ((episode.unsqueeze(-1) + step_weight * step) * turn_mask).to(turn_returns.dtype)


def spread_turn_values(turn_values: Tensor, token_turns: Tensor) -> Tensor:
    """``(B, K)`` per-turn values -> ``(B, T)``: each model token gets its turn's value.

    ``token_turns[b, t]`` is the turn index of a model token and -1 for masked tokens (built from
    ``Trajectory.turns`` spans).
    """
    index = token_turns.clamp(min=0).long()
    spread = torch.gather(turn_values, 1, index)
    return torch.where(token_turns >= 0, spread, torch.zeros_like(spread))


# -- which samples carry signal ------------------------------------------------------------------


def varied_groups_mask(rewards: Tensor, group_ids: Tensor, tolerance: float = 1e-8) -> Tensor:
    """Dynamic sampling (DAPO, Yu et al. 2025, eq. 11): keep only groups whose rewards differ.

    A group where every sample scored the same has zero advantage everywhere and only dilutes the
    batch. Returns a ``(B,)`` bool mask of trajectories to keep.
    """
    _, std, count = group_mean_std(rewards, group_ids)
    return (std > tolerance) & (count > 1)


def overlong_filter(loss_mask: Tensor, truncated: Tensor) -> Tensor:
    """Overlong filtering (DAPO, sec. 3.4): trajectories cut off by the response budget carry no
    reliable outcome, so their tokens leave the loss. ``truncated`` is ``(B,)`` bool."""
    return loss_mask * (~truncated.bool()).unsqueeze(-1).to(loss_mask.dtype)
