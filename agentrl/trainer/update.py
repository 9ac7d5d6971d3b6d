"""The update of one training step: the loss on each of the step's loss batches, weighted, with
their optimizer steps.

- an on-policy batch (:func:`update_policy`): PPO epochs over shuffled minibatches, gradients
  accumulated over micro-batches, the configured estimator's advantages, pi_old either from a
  scoring pass or, for a single update, from the training forward pass itself;
- a replay batch (:func:`update_replay`, SPEAR's self-imitation): its own optimizer steps after
  the on-policy ones, its ratio taken against the logprobs stored when the rows were collected.

:func:`update` runs a step's batches in order and reports whether any optimizer step was taken.

Device: a loss batch arrives collated on the CPU; each entry point here (the updates, the scoring
pass, the Clip-Cov selection) moves it to the model's device (``trainer.device``) first, and every
tensor made from it is made there. What an update hands back on its :class:`LossBatch`
(``advantages``, ``old_logprobs``) is on the CPU again, beside the batch it came with.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from agentrl.algos import advantages as adv
from agentrl.algos import critic as critic_lib
from agentrl.algos import losses
from agentrl.config import AlgoConfig, RunConfig
from agentrl.trainer.batching import TrainBatch, forward_response, model_device
from agentrl.trainer.estimators import (
    compute_advantages,
    covariance_selected,
    kl_goes_in_reward,
    policy_token_loss,
    reward_kl,
    train_critic,
    uses_covariance_selection,
)
from agentrl.trainer.optim import clip_and_step
from agentrl.trajectory import Trajectory


@dataclass
class LossBatch:
    """One batch of a step's loss, as a recipe hands it to :func:`update`.

    ``kind="policy"``: on-policy rows; the estimator of ``algo`` (default: the run's) gives the
    advantages, and pi_old is the policy before the update. ``kind="replay"``: off-policy rows with
    given ``advantages`` ``(B,)`` or ``(B, T)`` and ``old_logprobs`` (their collection-time
    logprobs), trained by SPEAR's self-imitation loss at ``weight``. After the update, a policy
    batch's ``advantages`` and ``old_logprobs`` hold what the update used (SPEAR's buffer stores them).
    ``name`` prefixes the batch's metrics (none for the step's main batch, ``"policy"``).
    ``temperature`` and ``top_p``: the distribution the rows were sampled from, when it is not the
    run's ``rollout`` one (self-play's roles sample at their own temperatures).
    """

    batch: TrainBatch
    trajectories: list[Trajectory]
    name: str = "policy"
    kind: str = "policy"
    algo: AlgoConfig | None = None
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    weight: float = 1.0
    temperature: float | None = None
    top_p: float | None = None

    @property
    def tokens(self) -> float:
        return float(self.batch.loss_mask.sum())


@dataclass
class StepCounts:
    """The optimizer steps of one batch's update: minibatches seen, steps taken, steps skipped for a
    non-finite gradient norm, steps skipped for a zero gradient (nothing to learn), and the summed
    norm of the steps taken (under ``grad_key``)."""

    grad_key: str
    minibatches: int = 0
    updates: int = 0
    skipped: int = 0
    zero: int = 0

    def record(self, sums: dict[str, float], grad_norm: float, stepped: bool) -> None:
        self.minibatches += 1
        if stepped:
            sums[self.grad_key] = sums.get(self.grad_key, 0.0) + grad_norm
            self.updates += 1
        elif grad_norm == 0.0:
            self.zero += 1
        else:
            self.skipped += 1

    def means(self, sums: dict[str, float]) -> dict[str, float]:
        """Per-minibatch means of ``sums``; the grad norm's over the steps taken."""
        return {key: value / (self.updates if key == self.grad_key else self.minibatches) for key, value in sums.items()}


def update(run: Any, parts: list[LossBatch], step: int) -> dict[str, float]:
    """The loss on each batch in order (on-policy ones first, as the recipe lists them), each with
    its own optimizer steps. ``update/skipped`` is set when no optimizer step was taken at all."""
    metrics: dict[str, float] = {}
    stepped = False
    for part in parts:
        if part.tokens == 0:
            continue
        if part.kind == "replay":
            result = update_replay(run, part, step)
        elif part.kind == "policy":
            result = update_policy(run, part, step)
        else:
            raise ValueError(f"unknown loss batch kind {part.kind!r}; use policy or replay")
        stepped |= "update/skipped" not in result
        if part.advantages is not None:  # handed back on the CPU, beside the batch (a recipe may keep them)
            part.advantages = part.advantages.cpu()
        if part.old_logprobs is not None:
            part.old_logprobs = part.old_logprobs.cpu()
        prefix = "" if part.name == "policy" else f"{part.name}/"
        metrics.update({key if key.startswith(prefix) else f"{prefix}{key}": value for key, value in result.items()
                        if key != "update/skipped"})  # set below, for the step as a whole
    if not stepped:
        metrics["update/skipped"] = 1.0
    return metrics


def autocast(run: Any):
    """bf16 compute over the fp32 master weights (``trainer.precision=bf16``) on the model's device."""
    if run.config.trainer.precision == "bf16":
        return torch.autocast(device_type=model_device(run.model).type, dtype=torch.bfloat16)
    return nullcontext()


def micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def even_minibatches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``ceil(B / size)`` minibatches of near-equal size: a ragged remainder of a few trajectories
    would otherwise get a full Adam step (Adam's step size barely depends on the batch)."""
    return [chunk for chunk in torch.tensor_split(rows, max(1, math.ceil(len(rows) / size))) if len(chunk)]


def sampling_options(config: RunConfig, part: LossBatch | None = None) -> dict[str, float]:
    """Score tokens under the distribution the rollout sampled from (temperature, top-p): the
    loss batch's own where it has one, else the run's."""
    temperature = part.temperature if part is not None and part.temperature is not None else config.rollout.temperature
    top_p = part.top_p if part is not None and part.top_p is not None else config.rollout.top_p
    return {"temperature": temperature, "top_p": top_p}


@torch.no_grad()
def score_batch(run: Any, batch: TrainBatch, algo: AlgoConfig | None = None, part: LossBatch | None = None):
    """Logprobs of the current policy before the update (PPO's pi_old), the reference's, values, and
    for ArCHer the turn-boundary features ``(state, action)``, each ``(B, K, H)``; on the model's device."""
    batch = batch.to(model_device(run.model))
    shape, sampling, device = batch.response_ids.shape, sampling_options(run.config, part), batch.device
    old = torch.zeros(shape, device=device)
    values = torch.zeros(shape, device=device) if run.value_head is not None else None
    algo = algo or run.config.algo
    reference = torch.zeros(shape, device=device) if algo.kl_coef > 0 else None
    features = None
    if run.critic is not None:
        size = (batch.size, batch.turn_mask.shape[1], run.model.config.hidden_size)
        features = (torch.zeros(size, device=device), torch.zeros(size, device=device))
    for rows in micro_batches(torch.arange(batch.size, device=device), run.config.trainer.micro_batch_size):
        sub = batch.select(rows)
        width = sub.response_ids.shape[1]
        with autocast(run):
            out = forward_response(run.model, sub, run.value_head, with_hidden=features is not None, **sampling)
            old[rows, :width] = out.logprobs
            if values is not None:
                values[rows, :width] = out.values
            if features is not None:
                state, action = critic_lib.turn_features(out.hidden, sub.token_turns, sub.turn_mask)
                features[0][rows], features[1][rows] = state, action
            if reference is not None:
                if run.reference is not None:
                    reference[rows, :width] = forward_response(run.reference, sub, **sampling).logprobs
                else:  # LoRA: the reference is the base model, the adapters switched off
                    with run.model.disable_adapter():
                        reference[rows, :width] = forward_response(run.model, sub, **sampling).logprobs
    return old, reference, values, features


def single_update(config: RunConfig, batch_size: int, algo: AlgoConfig | None = None) -> bool:
    """Whether the update is one optimizer step on the whole batch with nothing else needing the
    pre-update policy's outputs up front (a reference model's logprobs, GAE's values)."""
    algo = algo or config.algo
    return (config.trainer.epochs == 1 and config.trainer.minibatch_size >= batch_size
            and algo.kl_coef == 0 and algo.advantage not in ("gae", "archer"))


def update_policy(run: Any, part: LossBatch, step: int) -> dict[str, float]:
    """PPO epochs over shuffled minibatches of an on-policy batch, gradients accumulated over
    micro-batches. Fills ``part.advantages`` and ``part.old_logprobs`` (pi_old)."""
    config, algo, batch = run.config, part.algo or run.config.algo, part.batch.to(model_device(run.model))
    loss_mask = batch.loss_mask
    kl_in_reward = kl_goes_in_reward(algo)
    if single_update(config, batch.size, algo):
        # One optimizer step: the policy before the update is the one the training forward pass
        # runs, so its detached logprobs are pi_old exactly and a separate scoring pass is saved.
        old = reference = old_values = features = None
    else:
        old, reference, old_values, features = score_batch(run, batch, algo, part)
    seen_old = torch.zeros(batch.response_ids.shape, device=batch.device) if old is None else old
    critic_metrics, turn_advantages = {}, None
    if run.critic is not None:
        critic_metrics, turn_advantages = train_critic(run, batch, features, step)
    advantages, returns = compute_advantages(batch, loss_mask, algo, old_values, reward_kl(old, reference, loss_mask, algo),
                                             turn_advantages)
    part.advantages, part.old_logprobs = advantages, seen_old
    if run.critic is not None and run.critic.collections <= algo.archer.warmup_steps:
        # the actor waits for a trained critic; the policy is unchanged, so nothing it sampled turns stale
        return {**critic_metrics, "update/critic_warmup": 1.0, "update/skipped": 1.0}
    metrics = {**critic_metrics,
        "rollout/stale_fraction": float((batch.stale * loss_mask).sum() / loss_mask.sum()),
        "advantage/mean": float(adv.masked_mean(advantages, loss_mask)),
        "advantage/abs_mean": float(adv.masked_mean(advantages.abs(), loss_mask)),
    }
    mismatch = [0.0, 0.0]  # |pi_old - mu| over the fresh model tokens (first epoch), and their count
    stale_weights = [0.0, 0.0]  # the loss's importance weights summed over stale tokens (first epoch), their count
    sums: dict[str, float] = {}
    generator = torch.Generator().manual_seed(config.trainer.seed * 100_003 + step)
    run.model.train()
    # the value head (GAE) is clipped on its own budget: the policy's and the critic's gradients differ in scale
    value_parameters = list(run.value_head.parameters()) if run.value_head is not None else []
    value_ids = {id(p) for p in value_parameters}
    parameters = [p for group in run.optimizer.param_groups for p in group["params"] if id(p) not in value_ids]
    counts = StepCounts("grad_norm")
    for epoch in range(config.trainer.epochs):
        order = torch.randperm(batch.size, generator=generator)
        for minibatch in even_minibatches(order, config.trainer.minibatch_size):
            totals = {"batch_tokens": float(loss_mask[minibatch].sum()),
                      "batch_sequences": losses.sequence_count(loss_mask[minibatch]),
                      "max_response_tokens": config.rollout.max_response_tokens}
            run.optimizer.zero_grad(set_to_none=True)
            selected = minibatch_covariance_selection(run, batch, minibatch, old, advantages, generator, algo, part) \
                if uses_covariance_selection(algo) else None
            for rows in micro_batches(minibatch, config.trainer.micro_batch_size):
                sub = batch.select(rows)
                width = sub.response_ids.shape[1]
                mask = loss_mask[rows, :width]

                def cut(tensor, rows=rows, width=width):
                    return tensor[rows, :width]

                with autocast(run):
                    out = forward_response(run.model, sub, run.value_head, with_entropy=wants_entropy(config, algo),
                                           entropy_grad=algo.entropy_coef > 0, value_trunk_grad=algo.value_trunk_grad,
                                           **sampling_options(config, part))
                if old is None:
                    old_sub = out.logprobs.detach()
                    if epoch == 0:
                        seen_old[rows, :width] = old_sub
                else:
                    old_sub = cut(old)
                sampling, stale = cut(batch.sampling_logprobs), cut(batch.stale)
                if epoch == 0:
                    fresh = mask * (1 - stale)
                    mismatch[0] += float(((old_sub - sampling).abs() * fresh).sum())
                    mismatch[1] += float(fresh.sum())
                # truncated IS on the stale tokens, or (is_all_tokens) also on fresh ones whose mu differs
                # from pi_old by numerics (bf16, KV cache): rollout/logprob_mismatch measures the need
                weighted = mask if algo.is_all_tokens else stale
                is_weights = losses.stale_importance_weights(old_sub, sampling, weighted, algo.stale_is_cap)
                if epoch == 0:
                    stale_weights[0] += float((is_weights * stale * mask).sum())
                    stale_weights[1] += float((stale * mask).sum())
                token_loss, clipped = policy_token_loss(out.logprobs, old_sub, cut(advantages), mask, algo, generator,
                                                        None if selected is None else cut(selected))
                policy_loss = losses.aggregate_loss(token_loss * is_weights, mask, algo.loss_agg, **totals)
                loss = policy_loss
                # metrics are token means whatever the loss aggregation, so they stay fractions and means
                token_mean = {"batch_tokens": totals["batch_tokens"]}
                parts = {"loss/policy": policy_loss, "clip_fraction": losses.aggregate_loss(clipped, mask, **token_mean)}
                if reference is not None and not kl_in_reward:
                    kl_tokens = losses.kl_penalty(out.logprobs, cut(reference), algo.kl_loss_type, loss_mask=mask)
                    kl = losses.aggregate_loss(kl_tokens, mask, algo.loss_agg, **totals)
                    loss, parts["loss/kl"] = loss + algo.kl_coef * kl, kl
                if out.entropy is not None:
                    parts["entropy"] = losses.aggregate_loss(out.entropy.detach(), mask, **token_mean)
                    if algo.entropy_coef > 0:
                        loss = loss - algo.entropy_coef * losses.aggregate_loss(out.entropy, mask, algo.loss_agg, **totals)
                if out.values is not None:
                    value = losses.aggregate_loss(losses.value_loss(out.values, cut(old_values), cut(returns), algo.value_clip),
                                                  mask, algo.loss_agg, **totals)
                    loss, parts["loss/value"] = loss + algo.value_coef * value, value
                loss.backward()
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
            counts.record(sums, *clip_and_step(run.optimizer, parameters, config.trainer.max_grad_norm,
                                               *([value_parameters] if value_parameters else [])))
    run.optimizer.zero_grad(set_to_none=True)
    run.model.eval()
    metrics.update(counts.means(sums))
    metrics["update/nonfinite_skipped"] = float(counts.skipped)
    metrics["update/zero_grad_skipped"] = float(counts.zero)
    if not counts.updates:  # the policy is as it was: no weights to send, nothing turns stale
        metrics["update/skipped"] = 1.0
    metrics["rollout/logprob_mismatch"] = mismatch[0] / max(mismatch[1], 1.0)
    if stale_weights[1]:
        metrics["rollout/stale_is_weight_mean"] = stale_weights[0] / stale_weights[1]
    metrics["lr"] = run.optimizer.param_groups[0]["lr"]
    metrics["update/trajectories"] = float(batch.size)
    return metrics


@torch.no_grad()
def minibatch_covariance_selection(run: Any, batch: TrainBatch, minibatch: torch.Tensor, old: torch.Tensor | None,
                                   advantages: torch.Tensor, generator: torch.Generator,
                                   algo: AlgoConfig | None = None, part: LossBatch | None = None) -> torch.Tensor:
    """``(B, T)``: the Clip-Cov/KL-Cov tokens of ``minibatch``, chosen from a no-grad pass of the
    current policy over the whole minibatch (so ``micro_batch_size`` stays a memory knob only)."""
    config, batch = run.config, batch.to(model_device(run.model))
    advantages, old = advantages.to(batch.device), None if old is None else old.to(batch.device)
    current = torch.zeros(batch.response_ids.shape, device=batch.device)
    for rows in micro_batches(minibatch, config.trainer.micro_batch_size):
        sub = batch.select(rows)
        with autocast(run):
            current[rows, : sub.response_ids.shape[1]] = forward_response(run.model, sub,
                                                                          **sampling_options(config, part)).logprobs
    anchor = current[minibatch] if old is None else old[minibatch]
    selected = torch.zeros(batch.response_ids.shape, device=batch.device)
    selected[minibatch] = covariance_selected(current[minibatch], anchor, advantages[minibatch],
                                              batch.loss_mask[minibatch], algo or config.algo, generator)
    return selected




def wants_entropy(config: RunConfig, algo: AlgoConfig) -> bool:
    """The policy's entropy is computed when it is in the loss or logged (``trainer.log_entropy``)."""
    return algo.entropy_coef > 0 or config.trainer.log_entropy


def update_replay(run: Any, part: LossBatch, step: int) -> dict[str, float]:
    """SPEAR's self-imitation update (``dp_actor.update_policy``, the replay half): the replay rows in
    shuffled minibatches of ``trainer.minibatch_size``, each minibatch its own optimizer step, with
    :func:`agentrl.algos.spear.sil_loss` against ``part.old_logprobs``, the logprobs stored when the
    rows were collected, so the ratio is a true off-policy ratio. ``part.advantages`` are the
    recalibrated ``A~ >= 0`` of each row, ``part.weight`` is ``w_sil(t)``. Clip-Cov runs with the
    replay parameters (``spear.replay_clip_cov_*``) over each micro-batch."""
    from agentrl.algos.spear import sil_loss

    config, algo, spear = run.config, part.algo or run.config.algo, run.config.spear
    batch = part.batch.to(model_device(run.model))
    loss_mask, old, advantages = batch.loss_mask, part.old_logprobs, part.advantages.to(batch.device)
    advantages = advantages if advantages.dim() == 2 else advantages[:, None] * (loss_mask > 0)
    old = None if old is None else old.to(batch.device)
    if old is None or old.shape != loss_mask.shape or advantages.shape != loss_mask.shape:
        raise ValueError(f"a replay batch needs old logprobs and advantages shaped like its loss mask {tuple(loss_mask.shape)}")
    generator = torch.Generator().manual_seed(config.trainer.seed * 100_043 + step)
    parameters = [p for group in run.optimizer.param_groups for p in group["params"]
                  if run.value_head is None or all(p is not q for q in run.value_head.parameters())]
    sums: dict[str, float] = {}
    counts = StepCounts("sil/grad_norm")
    run.model.train()
    order = torch.randperm(batch.size, generator=generator)
    for minibatch in even_minibatches(order, config.trainer.minibatch_size):
        totals = {"batch_tokens": float(loss_mask[minibatch].sum()),
                  "batch_sequences": losses.sequence_count(loss_mask[minibatch])}
        run.optimizer.zero_grad(set_to_none=True)
        for rows in micro_batches(minibatch, config.trainer.micro_batch_size):
            sub = batch.select(rows)
            width = sub.response_ids.shape[1]
            with autocast(run):
                out = forward_response(run.model, sub, with_entropy=wants_entropy(config, algo),
                                       entropy_grad=algo.entropy_coef > 0, **sampling_options(config, part))
            mask = loss_mask[rows, :width]
            loss, parts = sil_loss(
                out.logprobs, old[rows, :width], advantages[rows, :width], mask, part.weight,
                clip_low=algo.clip_low, clip_high=algo.clip_high, clip_cov_ratio=spear.replay_clip_cov_ratio,
                cov_lower=spear.replay_clip_cov_lower, cov_upper=spear.replay_clip_cov_upper,
                aggregation=algo.loss_agg, max_response_tokens=config.rollout.max_response_tokens,
                entropy=out.entropy if algo.entropy_coef > 0 else None, entropy_coef=algo.entropy_coef,
                generator=generator, **totals)
            if out.entropy is not None:
                parts["sil/entropy"] = float(losses.aggregate_loss(out.entropy.detach(), mask,
                                                                   batch_tokens=totals["batch_tokens"]))
            loss.backward()
            share = float(mask.sum()) / max(totals["batch_tokens"], 1.0)  # token-weighted means over the minibatch
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + (value if key in ("sil/loss", "sil/entropy") else value * share)
        counts.record(sums, *clip_and_step(run.optimizer, parameters, config.trainer.max_grad_norm))
    run.optimizer.zero_grad(set_to_none=True)
    run.model.eval()
    metrics = counts.means(sums)
    metrics["sil/weight"] = float(part.weight)
    metrics.update({"sil/rows": float(batch.size), "sil/updates": float(counts.updates),
                    "sil/nonfinite_skipped": float(counts.skipped), "sil/zero_grad_skipped": float(counts.zero)})
    if not counts.updates:
        metrics["update/skipped"] = 1.0
    return metrics
