"""The configured estimator: from a train batch to per-token advantages, the in-reward KL, the
surrogate loss, which groups carry signal (dynamic sampling) and the ArCHer critic's step.

Pure functions of the batch and the ``algo`` config, so the trainer loop (``local``) only wires them.
"""

from __future__ import annotations

import torch

from agentrl.algos import advantages as adv
from agentrl.algos import critic as critic_lib
from agentrl.algos import losses
from agentrl.config import KL_IN_REWARD_ESTIMATORS, AlgoConfig
from agentrl.trainer.batching import TrainBatch, collate
from agentrl.trajectory import Trajectory


def kl_goes_in_reward(algo: AlgoConfig) -> bool:
    return algo.kl_in_reward if algo.kl_in_reward is not None else algo.advantage in KL_IN_REWARD_ESTIMATORS


def reward_kl(old: torch.Tensor | None, reference: torch.Tensor | None, loss_mask: torch.Tensor,
              algo: AlgoConfig) -> torch.Tensor | None:
    """The per-token KL that enters the token rewards (REINFORCE++, GAE, or ``algo.kl_in_reward``):
    ``algo.kl_reward_type``, k1 by default, the only estimator whose score-function gradient is
    ``grad KL(pi || ref)``; None when the KL goes into the loss instead."""
    if reference is None or old is None or not kl_goes_in_reward(algo):
        return None
    return losses.kl_penalty(old, reference, algo.kl_reward_type, loss_mask=loss_mask)


def compute_advantages(batch: TrainBatch, loss_mask: torch.Tensor, algo: AlgoConfig,
                       values: torch.Tensor | None = None,
                       token_kl: torch.Tensor | None = None,
                       turn_advantages: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages (and value targets for GAE) by the configured estimator.

    ``token_kl`` (from :func:`reward_kl`) is subtracted from the token rewards where the estimator
    has them; REINFORCE++ and GAE put the KL there by default (as in their papers), the others keep
    it in the loss. ``turn_advantages`` ``(B, K)`` are the ArCHer critic's.
    """
    name, rewards, groups = algo.advantage, batch.rewards, batch.group_ids
    if token_kl is not None and name not in ("reinforce_pp", "gae"):
        # kl_in_reward for a sequence-level estimator: the trajectory's summed KL leaves its reward
        rewards = rewards - algo.kl_coef * (token_kl * loss_mask).sum(-1)
    if name in ("grpo", "dr_grpo", "rloo"):
        sequence = {"grpo": lambda: adv.grpo_advantages(rewards, groups, algo.norm_std),
                    "dr_grpo": lambda: adv.dr_grpo_advantages(rewards, groups),
                    "rloo": lambda: adv.rloo_advantages(rewards, groups)}[name]()
        return adv.broadcast_to_tokens(sequence, loss_mask), None
    if name == "reinforce":  # A = R on every model token: no baseline (verl's GRPO over groups of one)
        return adv.broadcast_to_tokens(rewards, loss_mask), None
    if name == "reinforce_pp":
        return adv.reinforce_pp_advantages(rewards, loss_mask, algo.gamma, token_kl, algo.kl_coef), None
    if name == "reinforce_pp_baseline":
        return adv.reinforce_pp_baseline_advantages(rewards, groups, loss_mask), None
    if name == "gae":
        token_rewards = adv.last_token_rewards(rewards, loss_mask)
        if token_kl is not None:
            token_rewards = token_rewards - algo.kl_coef * token_kl * loss_mask
        advantages, returns = adv.gae_advantages(token_rewards, values, loss_mask, algo.gamma, algo.lam)
        if algo.whiten_gae:  # after the returns: the value targets stay in reward units (as verl)
            advantages = adv.masked_whiten(advantages, loss_mask)
        return advantages, returns
    if name in ("turn_grpo", "gigpo"):
        turn_rewards = batch.turn_rewards
        if token_kl is not None:  # each turn's summed KL leaves that turn's reward
            kl_sum = torch.zeros_like(turn_rewards).scatter_add_(
                1, batch.token_turns.clamp(min=0), token_kl * loss_mask * (batch.token_turns >= 0))
            turn_rewards = turn_rewards - algo.kl_coef * kl_sum
        gamma = algo.turn_gamma if name == "turn_grpo" else algo.gigpo.gamma
        returns = adv.discounted_turn_returns(turn_rewards, batch.turn_mask, gamma)
        if name == "turn_grpo":
            per_turn = adv.turn_grpo_advantages(returns, batch.turn_mask, groups, algo.norm_std)
        else:
            episode_rewards = (turn_rewards * batch.turn_mask).sum(-1)
            per_turn = adv.gigpo_advantages(episode_rewards, groups, returns, batch.turn_mask, batch.anchor_keys,
                                            algo.gigpo.step_weight, algo.norm_std)
        return adv.spread_turn_values(per_turn, batch.token_turns) * loss_mask, None
    if name == "archer":
        if turn_advantages is None:
            raise ValueError("the archer estimator needs the critic's per-turn advantages (turn_advantages)")
        return adv.spread_turn_values(turn_advantages, batch.token_turns) * loss_mask, None
    raise ValueError(f"unknown advantage estimator {name!r}")


def policy_token_loss(logprobs, old_logprobs, advantages, loss_mask, algo: AlgoConfig, generator=None, selected=None):
    """The configured surrogate: KL-Cov, Clip-Cov or PPO clip (with clip-higher and dual clip).
    ``selected``: the Cov tokens chosen over the whole minibatch (see :func:`covariance_selected`)."""
    if algo.kl_cov_ratio > 0:
        return losses.kl_cov_loss(logprobs, old_logprobs, advantages, loss_mask, algo.kl_cov_ratio, algo.kl_cov_coef,
                                  selected)
    if algo.clip_cov_ratio > 0:
        return losses.clip_cov_loss(logprobs, old_logprobs, advantages, loss_mask, algo.clip_low, algo.clip_high,
                                    algo.clip_cov_ratio, algo.clip_cov_lower, algo.clip_cov_upper, generator, selected)
    return losses.ppo_clip_loss(logprobs, old_logprobs, advantages, algo.clip_low, algo.clip_high,
                                algo.dual_clip, loss_mask=loss_mask)


def groups_with_signal(trajectories: list[Trajectory], algo: AlgoConfig) -> list[Trajectory]:
    """The trajectories of groups whose estimator sees a difference (DAPO, Yu et al. 2025, eq. 11):
    outcome rewards that vary, or for the turn-level estimators any turn's return that varies."""
    if not trajectories:
        return []
    batch = collate(trajectories, 0)
    keep = adv.varied_groups_mask(batch.rewards, batch.group_ids)
    if algo.advantage in ("turn_grpo", "gigpo"):
        gamma = algo.turn_gamma if algo.advantage == "turn_grpo" else algo.gigpo.gamma
        returns = adv.discounted_turn_returns(batch.turn_rewards, batch.turn_mask, gamma)
        for turn in range(returns.shape[1]):
            rows = (batch.turn_mask[:, turn] > 0).nonzero().squeeze(-1)
            varied = adv.varied_groups_mask(returns[rows, turn], batch.group_ids[rows])
            keep |= torch.isin(batch.group_ids, batch.group_ids[rows][varied])
    return [t for t, kept in zip(trajectories, keep.tolist()) if kept]


def train_critic(run, batch: TrainBatch, features, step: int) -> tuple[dict[str, float], torch.Tensor]:
    """ArCHer: add this batch's turn transitions to the replay buffer, take the configured TD steps,
    and return the metrics and the per-turn advantages ``(B, K)`` of the updated critic."""
    archer = run.config.algo.archer
    state, action = features
    run.critic.add(critic_lib.turn_transitions(state, action, batch.turn_rewards, batch.turn_mask))
    generator = torch.Generator().manual_seed(run.config.trainer.seed * 100_019 + step)
    metrics = run.critic.update(archer.updates_per_step, generator)
    turn_advantages = run.critic.advantages(state, action, batch.turn_mask)
    valid = batch.turn_mask > 0
    metrics["critic/advantage_abs_mean"] = float(turn_advantages[valid].abs().mean()) if valid.any() else 0.0
    return metrics, turn_advantages


def uses_covariance_selection(algo: AlgoConfig) -> bool:
    return algo.kl_cov_ratio > 0 or algo.clip_cov_ratio > 0


def covariance_selected(logprobs, old_logprobs, advantages, loss_mask, algo: AlgoConfig, generator=None):
    """Clip-Cov's detached or KL-Cov's penalised tokens chosen over a whole minibatch ``(B, T)``:
    the centring means, the covariance and the budget ``max(int(ratio * N), 1)`` are the
    minibatch's, so the choice (and the gradient) does not depend on ``micro_batch_size``, as the
    paper's batch-level Cov. verl chooses per micro-batch."""
    with torch.no_grad():
        _, selected = policy_token_loss(logprobs, old_logprobs, advantages, loss_mask, algo, generator)
    return selected
