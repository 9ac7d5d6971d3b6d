"""Policy losses: pure functions over ``(B, T)`` tensors of response tokens, all masked by the loss
mask (1 on tokens the policy sampled, 0 on observation and template tokens).

Each returns the per-token loss; :func:`aggregate_loss` reduces it with the chosen normaliser. The
trainer passes whole-minibatch normalisers so that gradient accumulation over micro-batches gives
the same gradient as one large batch.
"""

from __future__ import annotations

from typing import Literal

import torch

Tensor = torch.Tensor
Aggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "dr-grpo"]
KLKind = Literal["k1", "k2", "mse", "k3", "low_var_kl"]
LOG_RATIO_BOUND = 20.0  # as verl: exp(20) ~ 5e8 is finite in fp32, and no useful ratio is larger


# -- aggregation ---------------------------------------------------------------------------------


def aggregate_loss(
    token_loss: Tensor,
    loss_mask: Tensor,
    mode: Aggregation = "token-mean",
    *,
    batch_tokens: float | None = None,
    batch_sequences: float | None = None,
    max_response_tokens: int | None = None,
) -> Tensor:
    """Reduce a ``(B, T)`` per-token loss to a scalar.

    - ``token-mean`` (DAPO): ``sum_{i,t} l_{i,t} / sum_i |o_i|``; every token weighs the same.
    - ``seq-mean-token-sum``: ``1/G sum_i sum_t l_{i,t}``.
    - ``seq-mean-token-mean`` (the original GRPO): ``1/G sum_i 1/|o_i| sum_t l_{i,t}``.
    - ``dr-grpo`` (Liu et al. 2025): ``1/(G * L_max) sum_{i,t} l_{i,t}`` with the constant
      ``L_max = max_response_tokens``, so no length bias enters through the normaliser.

    ``G`` counts the sequences with at least one model token: a row the overlong filter emptied is
    not a sample of the batch and must not shrink the others' gradient (as current verl).
    ``batch_tokens`` / ``batch_sequences`` override this tensor's own counts (the minibatch's
    counts when it is split into micro-batches; :func:`sequence_count` gives the latter).
    """
    mask = loss_mask.to(token_loss.dtype)
    # where, not a product: an overflowing ratio on a padded token (inf * 0 = nan) must not leak in
    masked = torch.where(loss_mask > 0, token_loss, torch.zeros_like(token_loss))
    sequences = float(batch_sequences) if batch_sequences is not None else sequence_count(loss_mask)
    if mode == "token-mean":
        tokens = batch_tokens if batch_tokens is not None else mask.sum()
        return masked.sum() / max(float(tokens), 1.0)
    if mode == "seq-mean-token-sum":
        return masked.sum() / max(sequences, 1.0)
    if mode == "seq-mean-token-mean":
        per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        return per_sequence.sum() / max(sequences, 1.0)
    if mode == "dr-grpo":
        if max_response_tokens is None:
            raise ValueError("the dr-grpo aggregation needs max_response_tokens (rollout.max_response_tokens)")
        return masked.sum() / (max(sequences, 1.0) * max_response_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}; use token-mean, seq-mean-token-sum, seq-mean-token-mean or dr-grpo")


def sequence_count(loss_mask: Tensor) -> float:
    """The number of rows with at least one model token (the ``G`` of the sequence-level modes)."""
    return float((loss_mask.sum(-1) > 0).sum())


# -- the clipped surrogate -----------------------------------------------------------------------


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    loss_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) with asymmetric bounds (clip-higher,
    DAPO eq. 10) and dual clip (Ye et al. 2020, eq. 5)::

        rho_t = exp(log pi(a_t) - log pi_old(a_t))
        l_t   = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))
        l_t   = min(l_t, -c A_t)   where A_t < 0 (dual clip, c > 1)

    Returns ``(token_loss, clipped)``: the per-token loss and a 0/1 tensor of tokens whose gradient
    the clip removed. With ``loss_mask`` the ratio is pinned to 1 on masked tokens, so whatever sits
    there (an overflowing ratio) cannot reach the gradient even as ``0 * inf``.
    """
    ratio = torch.exp(_masked_log_ratio(logprobs, old_logprobs, loss_mask))
    unclipped = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(unclipped, clipped_loss)
    clipped = (clipped_loss > unclipped).to(logprobs.dtype)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, not {dual_clip}")
        lower = -advantages * dual_clip
        dual = (advantages < 0) & (token_loss > lower)
        token_loss = torch.where(dual, lower, token_loss)
        clipped = torch.where(dual, torch.ones_like(clipped), clipped)
    return token_loss, clipped


def clip_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio: float = 2e-4,
    cov_lower: float = 1.0,
    cov_upper: float = 5.0,
    generator: torch.Generator | None = None,
    selected: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", eq. 11).

    Entropy collapses through tokens whose log-probability and advantage covary strongly. Among the
    tokens the PPO clip left alone, those with centred covariance
    ``Cov_t = (log pi_t - mean(log pi)) (A_t - mean(A))`` in ``(cov_lower, cov_upper)`` are
    candidates; a random ``clip_ratio`` fraction of all model tokens is drawn from them and their
    gradient removed. Returns ``(token_loss, detached)``. ``selected`` gives the detached tokens
    (chosen over a whole minibatch) instead of choosing them from this tensor's tokens.
    """
    token_loss, clipped = ppo_clip_loss(logprobs, old_logprobs, advantages, clip_low, clip_high, loss_mask=loss_mask)
    if selected is not None:
        return token_loss * (1.0 - selected), selected
    valid = loss_mask > 0
    centered_logprob = logprobs.detach() - masked_mean_scalar(logprobs.detach(), loss_mask)
    centered_advantage = advantages - masked_mean_scalar(advantages, loss_mask)
    covariance = centered_logprob * centered_advantage
    candidates = valid & (clipped == 0) & (covariance > cov_lower) & (covariance < cov_upper)
    flat = candidates.flatten().nonzero().squeeze(-1)
    budget = max(int(clip_ratio * int(valid.sum())), 1)
    detached = torch.zeros_like(token_loss)
    if flat.numel():
        # drawn on the generator's device (the trainer's is a CPU one), so a seed picks the same tokens anywhere
        order = torch.randperm(flat.numel(), generator=generator, device=flat.device if generator is None else generator.device)
        chosen = flat[order[:budget].to(flat.device)]
        detached.view(-1)[chosen] = 1.0
    return token_loss * (1.0 - detached), detached


def kl_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    kl_ratio: float = 2e-3,
    kl_coef: float = 1.0,
    selected: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """KL-Cov (Cui et al. 2025, eq. 12): no ratio clip; the ``kl_ratio`` fraction of model tokens
    with the largest centred covariance get a KL penalty to the old policy instead::

        l_t = -A_t rho_t + kl_coef * |log pi(a_t) - log pi_old(a_t)|   for the top-k Cov_t tokens
        l_t = -A_t rho_t                                              otherwise

    Returns ``(token_loss, penalised)``. ``selected`` gives the penalised tokens (chosen over a
    whole minibatch) instead of choosing them from this tensor's tokens.
    """
    log_ratio = _masked_log_ratio(logprobs, old_logprobs, loss_mask)
    ratio = torch.exp(log_ratio)
    token_loss = -advantages * ratio
    valid = (loss_mask > 0).flatten()
    valid_index = valid.nonzero().squeeze(-1)
    penalised = torch.zeros_like(token_loss) if selected is None else selected
    if selected is None and valid_index.numel() and kl_ratio > 0:
        flat_logprob = logprobs.detach().flatten()[valid_index]
        flat_advantage = advantages.flatten()[valid_index]
        covariance = (flat_logprob - flat_logprob.mean()) * (flat_advantage - flat_advantage.mean())
        count = max(int(kl_ratio * valid_index.numel()), 1)
        chosen = valid_index[torch.topk(covariance, min(count, covariance.numel())).indices]
        penalised.view(-1)[chosen] = 1.0
    token_loss = token_loss + penalised * kl_coef * log_ratio.abs()
    return token_loss, penalised


def _masked_log_ratio(logprobs: Tensor, old_logprobs: Tensor, loss_mask: Tensor | None) -> Tensor:
    """``log pi - log pi_old``, clamped to +-20 before any ``exp`` (an overflowing ratio on a valid
    token would give ``0 * inf = nan`` in backward) and pinned to 0 on masked tokens."""
    log_ratio = torch.clamp(logprobs - old_logprobs, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    if loss_mask is None:
        return log_ratio
    return torch.where(loss_mask > 0, log_ratio, torch.zeros_like(log_ratio))


def masked_mean_scalar(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


# -- regularisers --------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind = "low_var_kl",
               loss_mask: Tensor | None = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL
    divergence"), with ``x = log pi_ref - log pi``::

        k1 = -x                       unbiased, high variance, can be negative
        k2 = mse = x^2 / 2            biased, low variance
        k3 = exp(x) - x - 1           unbiased, non-negative, low variance (x clamped to [-20, 20])
        low_var_kl = clamp(k3, -10, 10) with x clamped to [-20, 20] (as verl), robust to outliers

    Which one suits depends on where it goes. As a token *reward* (REINFORCE++, GAE) the score
    function term is ``E[k grad log pi]``, which is ``grad KL(pi || ref)`` exactly for k1 only. As a
    *loss*, k1's on-policy gradient is ``E[grad log pi] = 0`` (inert); k2's is ``grad KL(pi || ref)``
    and k3's is ``grad KL(ref || pi)`` (GRPO). With ``loss_mask``, ``x`` is pinned to 0 on masked
    tokens before the ``exp``, so whatever sits there cannot give ``0 * inf`` in backward.
    """
    log_ratio = ref_logprobs - logprobs
    if loss_mask is not None:
        log_ratio = torch.where(loss_mask > 0, log_ratio, torch.zeros_like(log_ratio))
    if kind == "k1":
        return -log_ratio
    if kind in ("k2", "mse"):
        return 0.5 * log_ratio**2
    if kind == "k3":
        log_ratio = torch.clamp(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        return torch.exp(log_ratio) - log_ratio - 1.0
    if kind == "low_var_kl":
        log_ratio = torch.clamp(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 (mse), k3 or low_var_kl")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """``H = logsumexp(z) - sum_v softmax(z)_v z_v`` per position, without materialising log p."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    return torch.logsumexp(logits.float(), dim=-1) - (probabilities * logits.float()).sum(-1)


def stale_importance_weights(
    old_logprobs: Tensor, sampling_logprobs: Tensor, stale_mask: Tensor, cap: float = 2.0
) -> Tensor:
    """Truncated importance weights for tokens sampled by an older policy (partial rollouts)::

        w_t = min(pi_old(a_t) / mu(a_t), cap)   for stale tokens,  1 otherwise

    ``mu`` is the behaviour policy that actually sampled the token (its logprobs were recorded by
    the engine); ``pi_old`` is the current policy before the update, the PPO anchor. Truncation
    (Espeholt et al. 2018, IMPALA, eq. 1's rho-bar) bounds the variance. No gradient flows through.
    """
    log_ratio = torch.clamp(old_logprobs.detach() - sampling_logprobs.detach(), max=LOG_RATIO_BOUND)
    weights = torch.exp(log_ratio).clamp(max=cap)
    return torch.where(stale_mask > 0, weights, torch.ones_like(weights))


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float = 0.2) -> Tensor:
    """PPO's clipped value loss (per token)::

        l_t = 1/2 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)
    """
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
