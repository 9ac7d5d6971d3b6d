"""agentrl's estimators and losses in verl's calling convention (registered by :mod:`agentrl.verl.plugin`).

The math is :mod:`agentrl.algos`'; this module only translates layouts:

- **Estimators** get ``token_level_rewards`` and ``response_mask`` ``(B, T)``, ``index`` (the
  group ``uid`` of each row, an object array) and ``config`` (verl's ``AlgoConfig``), and return
  ``(advantages, returns)``. A trajectory's turns are the runs of 1s in ``response_mask`` (an
  assistant turn is sampled in one piece; observation and template tokens, mask 0, sit between
  turns). A turn's reward is the sum of ``token_level_rewards`` from its first model token up to the
  next turn's, so a reward verl put on the last response token (an observation at the end, or the
  final ``reward_score``) counts for the last turn, and a KL penalty verl put on the tokens
  (``algorithm.use_kl_in_reward``) leaves the reward of the turn it was paid in, as in the local
  trainer.
- ``agentrl_gigpo`` also needs each turn's tokens and anchor state (GiGPO's step groups), which
  verl's advantage step does not hand an estimator: the agent loop writes them per response token
  (:func:`turn_fields`, the :data:`GIGPO_FIELDS` of its output) and agentrl's registered trainer
  (:mod:`agentrl.verl.trainer`) fetches them and passes them on with :func:`gigpo_inputs`.
- **Losses** get ``old_log_prob``, ``log_prob``, ``advantages``, ``response_mask`` (one micro-batch),
  ``loss_agg_mode``, ``config`` (verl's ``ActorConfig``) and ``rollout_is_weights``. The per-token
  loss is agentrl's; it is reduced by verl's ``agg_loss`` with ``config.global_batch_info``, so the
  result does not depend on how verl splits the batch over data-parallel ranks and micro-batches.
  verl adds the entropy and KL terms itself.

Names carry the ``agentrl_`` prefix, so none collides with verl's built-ins.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from agentrl.algos import advantages as adv
from agentrl.algos import losses
from agentrl.trajectory import Trajectory

Tensor = torch.Tensor

ESTIMATORS = ("agentrl_turn_grpo", "agentrl_gigpo")
# agentrl's algo.advantage values that read the env's per-turn rewards (the others only the trajectory's)
TURN_LEVEL_ESTIMATORS = ("turn_grpo", "gigpo")
POLICY_LOSSES = ("agentrl_ppo_clip", "agentrl_clip_cov", "agentrl_kl_cov", "agentrl_sil")


# -- layout helpers ------------------------------------------------------------------------------


def response_turns(response_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The turns of each row from its mask: ``(token_turns, reward_turns, turn_mask)``.

    ``token_turns`` ``(B, T)`` is the turn index of each model token and -1 elsewhere (the layout
    of :func:`agentrl.algos.advantages.spread_turn_values`); ``reward_turns`` ``(B, T)`` assigns
    every position to the turn its reward counts for (0 before the first turn); ``turn_mask``
    ``(B, K)`` marks the turns each row has.
    """
    mask = (response_mask > 0).long()
    previous = torch.nn.functional.pad(mask[:, :-1], (1, 0))
    starts = mask * (1 - previous)
    run = starts.cumsum(-1) - 1  # the index of the run a position is in or follows
    reward_turns = run.clamp(min=0)
    token_turns = torch.where(mask > 0, run, torch.full_like(run, -1))
    counts = starts.sum(-1)
    turns = max(1, int(counts.max())) if counts.numel() else 1
    turn_mask = (torch.arange(turns).unsqueeze(0) < counts.unsqueeze(-1)).float()
    return token_turns, reward_turns, turn_mask


def group_codes(index: Any, size: int) -> Tensor:
    """verl's group keys (``uid`` strings, or None: one group per row) as integer ids."""
    if index is None:
        return torch.arange(size)
    _, codes = np.unique(np.asarray([str(key) for key in index], dtype=object), return_inverse=True)
    return torch.as_tensor(codes.reshape(-1), dtype=torch.long)


# the agent loop's output fields GiGPO reads, one value per response token
GIGPO_FIELDS = ("agentrl_token_turns", "agentrl_token_anchors")


def turn_fields(trajectory: Trajectory, length: int, width: int | None = None) -> dict[str, list[int]]:
    """The :data:`GIGPO_FIELDS` of a trajectory's first ``length`` response tokens, ``width``
    (default ``length``) values each: a failed trajectory's output has none (``length=0``).

    ``agentrl_token_turns`` is each token's assistant turn, numbered 1.. in order (0 on observation
    and template tokens, and on the padding verl adds), ``agentrl_token_anchors`` that turn's
    anchor key (:func:`agentrl.trainer.batching.turn_anchor_keys`: the hash of the observation it
    answers; 0 elsewhere). The turns are the trajectory's own spans, as in the local trainer's batch.
    """
    from agentrl.trainer.batching import turn_anchor_keys

    turns, anchors = [0] * (length if width is None else width), [0] * (length if width is None else width)
    length = min(length, len(turns))
    numbers = sorted({span.turn for span in trajectory.turns if span.role == "assistant"})
    keys = dict(zip(numbers, turn_anchor_keys(trajectory)))
    column = {turn: index + 1 for index, turn in enumerate(numbers)}
    for span in trajectory.turns:
        if span.role == "assistant":
            for position in range(span.start, min(span.end, length)):
                turns[position], anchors[position] = column[span.turn], keys[span.turn]
    return {"agentrl_token_turns": turns, "agentrl_token_anchors": anchors}


_gigpo_inputs: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("agentrl_gigpo_inputs",
                                                                                       default=None)


@contextlib.contextmanager
def gigpo_inputs(token_turns: Tensor, token_anchors: Tensor, step_weight: float) -> Iterator[None]:
    """Hand ``agentrl_gigpo`` the batch's :data:`GIGPO_FIELDS` (``(B, T)``, the rows and padding of
    the ``response_mask`` verl passes it) and ``step_weight`` while verl's advantage step runs."""
    token = _gigpo_inputs.set({"token_turns": token_turns, "token_anchors": token_anchors,
                               "step_weight": step_weight})
    try:
        yield
    finally:
        _gigpo_inputs.reset(token)


def _get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


# -- estimators ----------------------------------------------------------------------------------


def turn_grpo(token_level_rewards: Tensor, response_mask: Tensor, index: Any = None, config: Any = None,
              **kwargs: Any) -> tuple[Tensor, Tensor]:
    """``algorithm.adv_estimator=agentrl_turn_grpo``: :func:`agentrl.algos.advantages.turn_grpo_advantages`
    on per-turn returns ``G_k = sum_{j>=k} gamma^{j-k} r_j``, each turn against the same turn of its group.

    ``algorithm.gamma`` is the discount across turns (agentrl's ``algo.turn_gamma``) and
    ``algorithm.norm_adv_by_std_in_grpo`` agentrl's ``algo.norm_std``. The per-turn rewards come
    from ``rm_scores`` (see :class:`agentrl.verl.agent_loop.AgentrlLoopOutput`). Returns the
    advantages twice (verl stores the second as ``returns``).
    """
    token_turns, reward_turns, turn_mask = response_turns(response_mask)
    rewards = token_level_rewards.double() * (reward_turns >= 0)
    turn_rewards = torch.zeros(turn_mask.shape, dtype=torch.float64).scatter_add_(1, reward_turns, rewards)
    gamma = float(_get(config, "gamma", 1.0))
    returns = adv.discounted_turn_returns(turn_rewards, turn_mask.double(), gamma)
    groups = group_codes(index, response_mask.shape[0])
    per_turn = adv.turn_grpo_advantages(returns, turn_mask.double(), groups,
                                        bool(_get(config, "norm_adv_by_std_in_grpo", True)))
    advantages = (adv.spread_turn_values(per_turn, token_turns) * response_mask).to(token_level_rewards.dtype)
    return advantages, advantages


def gigpo(token_level_rewards: Tensor, response_mask: Tensor, index: Any = None, config: Any = None,
          token_turns: Tensor | None = None, token_anchors: Tensor | None = None, step_weight: float | None = None,
          **kwargs: Any) -> tuple[Tensor, Tensor]:
    """``algorithm.adv_estimator=agentrl_gigpo``: :func:`agentrl.algos.advantages.gigpo_advantages`,
    an episode-level group advantage plus ``step_weight`` times a step-level one within the turns
    of a group that answer the same observation (anchor state), on per-turn returns
    ``R_k = sum_{j>=k} gamma^{j-k} r_j``.

    ``algorithm.gamma`` is agentrl's ``algo.gigpo.gamma`` and ``algorithm.norm_adv_by_std_in_grpo``
    ``algo.norm_std``; ``step_weight`` (``algo.gigpo.step_weight``), ``token_turns`` and
    ``token_anchors`` (the agent loop's :data:`GIGPO_FIELDS`) come as arguments or from
    :func:`gigpo_inputs`. A turn's reward is the sum of ``token_level_rewards`` from its first token
    up to the next turn's, as in :func:`turn_grpo`.
    """
    inputs = _gigpo_inputs.get() or {}
    token_turns = inputs.get("token_turns") if token_turns is None else token_turns
    token_anchors = inputs.get("token_anchors") if token_anchors is None else token_anchors
    step_weight = inputs.get("step_weight", 1.0) if step_weight is None else step_weight
    if token_turns is None or token_anchors is None:
        raise ValueError("agentrl_gigpo needs each turn's anchor state, which verl's advantage step does not pass: "
                         "run it under agentrl's trainer (trainer.v1.trainer_mode=agentrl_sync, agentrl_colocate_async "
                         "or agentrl_separate_async; agentrl train ... algo.advantage=gigpo sets it)")
    if token_turns.shape != response_mask.shape or token_anchors.shape != response_mask.shape:
        raise ValueError(f"agentrl_gigpo: the turn fields {tuple(token_turns.shape)} do not line up with the "
                         f"response mask {tuple(response_mask.shape)}")
    turns = token_turns.long().to(response_mask.device) - 1  # -1 off the assistant turns
    counts = turns.max(-1).values + 1 if turns.numel() else torch.zeros(turns.shape[0], dtype=torch.long)
    width = max(1, int(counts.max())) if counts.numel() else 1
    turn_mask = (torch.arange(width, device=turns.device).unsqueeze(0) < counts.unsqueeze(-1)).double()
    rows, positions = (turns >= 0).nonzero(as_tuple=True)
    anchor_keys = torch.zeros(turn_mask.shape, dtype=torch.long, device=turns.device)
    anchor_keys[rows, turns[rows, positions]] = token_anchors.long().to(turns.device)[rows, positions]
    reward_turns = torch.cummax(turns, dim=-1).values.clamp(min=0)  # the latest turn begun at each position
    turn_rewards = torch.zeros(turn_mask.shape, dtype=torch.float64, device=turns.device).scatter_add_(
        1, reward_turns, token_level_rewards.double())
    returns = adv.discounted_turn_returns(turn_rewards, turn_mask, float(_get(config, "gamma", 1.0)))
    per_turn = adv.gigpo_advantages((turn_rewards * turn_mask).sum(-1), group_codes(index, turns.shape[0]), returns,
                                    turn_mask, anchor_keys, float(step_weight),
                                    bool(_get(config, "norm_adv_by_std_in_grpo", True)))
    advantages = (adv.spread_turn_values(per_turn, turns) * response_mask).to(token_level_rewards.dtype)
    return advantages, advantages


# -- policy losses -------------------------------------------------------------------------------


def _aggregate(token_loss: Tensor, response_mask: Tensor, loss_agg_mode: str, config: Any,
               rollout_is_weights: Tensor | None) -> Tensor:
    from verl.trainer.ppo.core_algos import agg_loss

    if rollout_is_weights is not None:
        token_loss = token_loss * rollout_is_weights
    info = dict(getattr(config, "global_batch_info", None) or {})
    return agg_loss(loss_mat=token_loss, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **info)


def _clip_bounds(config: Any) -> tuple[float, float]:
    clip = _get(config, "clip_ratio", 0.2)
    return float(_get(config, "clip_ratio_low", clip)), float(_get(config, "clip_ratio_high", clip))


def _metrics(prefix: str, selected: Tensor, log_prob: Tensor, old_log_prob: Tensor,
             response_mask: Tensor) -> dict[str, float]:
    return {f"actor/{prefix}_fraction": float(losses.masked_mean_scalar(selected, response_mask)),
            "actor/ppo_kl": float(losses.masked_mean_scalar((old_log_prob - log_prob).detach(), response_mask))}


def ppo_clip(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
             loss_agg_mode: str = "token-mean", config: Any = None,
             rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """``loss_mode=agentrl_ppo_clip``: :func:`agentrl.algos.losses.ppo_clip_loss` with
    ``clip_ratio_low/high`` and the dual clip ``clip_ratio_c`` where it is above 1; ``clip_ratio_c
    <= 1`` turns the dual clip off (agentrl's ``algo.dual_clip=null``), which verl's ``vanilla``
    loss cannot (it always applies ``clip_ratio_c``, 3 by default)."""
    low, high = _clip_bounds(config)
    dual = float(_get(config, "clip_ratio_c", 0.0))
    token_loss, clipped = losses.ppo_clip_loss(log_prob, old_log_prob, advantages, low, high,
                                               dual if dual > 1.0 else None, loss_mask=response_mask)
    loss = _aggregate(token_loss, response_mask, loss_agg_mode, config, rollout_is_weights)
    return loss, _metrics("pg_clip", clipped, log_prob, old_log_prob, response_mask)


def clip_cov(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
             loss_agg_mode: str = "token-mean", config: Any = None,
             rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """``loss_mode=agentrl_clip_cov``: :func:`agentrl.algos.losses.clip_cov_loss` with
    ``clip_ratio_low/high`` and ``policy_loss.clip_cov_ratio/lb/ub``. verl hands the loss one
    micro-batch, so the detached tokens are chosen per micro-batch here (the local trainer chooses
    them over the whole minibatch); set the micro-batch to the minibatch for the same choice."""
    low, high = _clip_bounds(config)
    policy = config.policy_loss
    token_loss, detached = losses.clip_cov_loss(log_prob, old_log_prob, advantages, response_mask, low, high,
                                                policy.clip_cov_ratio, policy.clip_cov_lb, policy.clip_cov_ub)
    loss = _aggregate(token_loss, response_mask, loss_agg_mode, config, rollout_is_weights)
    return loss, _metrics("clip_cov", detached, log_prob, old_log_prob, response_mask)


def kl_cov(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
           loss_agg_mode: str = "token-mean", config: Any = None,
           rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """``loss_mode=agentrl_kl_cov``: :func:`agentrl.algos.losses.kl_cov_loss` with
    ``policy_loss.kl_cov_ratio`` and ``policy_loss.ppo_kl_coef`` (per micro-batch, as above)."""
    policy = config.policy_loss
    token_loss, penalised = losses.kl_cov_loss(log_prob, old_log_prob, advantages, response_mask,
                                               policy.kl_cov_ratio, policy.ppo_kl_coef)
    loss = _aggregate(token_loss, response_mask, loss_agg_mode, config, rollout_is_weights)
    return loss, _metrics("kl_cov", penalised, log_prob, old_log_prob, response_mask)


def sil(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
        loss_agg_mode: str = "token-mean", config: Any = None,
        rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """``loss_mode=agentrl_sil``: SPEAR's self-imitation loss, :func:`agentrl.algos.spear.sil_loss`
    with weight 1: Clip-Cov PPO against the logprobs of the policy that collected the rows, with
    the replay band from ``policy_loss.clip_cov_ratio/lb/ub`` and no dual clip. Its whole-batch
    normalisers are verl's ``global_batch_info`` per data-parallel rank.

    On its own it trains on whatever batch verl gives the actor; SPEAR's replay buffer and the
    ``w_sil(t)`` ramp need a registered trainer that mixes replayed rows in (docs/scale-out.md).
    """
    from agentrl.algos.spear import sil_loss

    if rollout_is_weights is not None:
        raise ValueError("loss_mode=agentrl_sil takes no rollout-correction weights: turn off "
                         "algorithm.rollout_correction for it (the replayed rows carry their own old logprobs)")
    if loss_agg_mode not in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        raise ValueError(f"loss_mode=agentrl_sil supports loss_agg_mode token-mean, seq-mean-token-sum or "
                         f"seq-mean-token-mean, not {loss_agg_mode!r}")
    low, high = _clip_bounds(config)
    policy = config.policy_loss
    info = dict(getattr(config, "global_batch_info", None) or {})
    ranks = float(info.get("dp_size") or 1)
    totals = {"batch_tokens": float(info["batch_num_tokens"]) / ranks if info.get("batch_num_tokens") else None,
              "batch_sequences": float(info["global_batch_size"]) / ranks if info.get("global_batch_size") else None}
    loss, metrics = sil_loss(log_prob, old_log_prob, advantages, response_mask, 1.0, clip_low=low, clip_high=high,
                             clip_cov_ratio=policy.clip_cov_ratio, cov_lower=policy.clip_cov_lb,
                             cov_upper=policy.clip_cov_ub, aggregation=loss_agg_mode, **totals)
    return loss, {f"actor/{key.replace('/', '_')}": value for key, value in metrics.items()}


def register_all() -> None:
    """Register the estimators and losses with verl (idempotent: verl accepts the same function twice)."""
    from verl.trainer.ppo import core_algos

    core_algos.register_adv_est("agentrl_turn_grpo")(turn_grpo)
    core_algos.register_adv_est("agentrl_gigpo")(gigpo)
    for name, function in zip(POLICY_LOSSES, (ppo_clip, clip_cov, kl_cov, sil)):
        core_algos.register_policy_loss(name)(function)
