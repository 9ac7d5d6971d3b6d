"""SPEAR: self-imitation with progressive exploration (Tencent Youtu, arXiv 2509.22601).

Two curricula on top of a group-relative baseline (GRPO or Dr.BoT, :mod:`agentrl.algos.drbot`):

1. a tool-call reward ``lambda_tc(t) min(1, 0.1 n_tc)`` that fades out with a cosine schedule
   (:func:`tool_call_weight`, :func:`shape_rewards`);
2. self-imitation: positive-advantage trajectories wait in a :class:`ReplayBuffer`, are replayed with
   advantages recalibrated against the median of recent group means, through a PPO loss against the
   logprobs of the policy that collected them (:func:`sil_loss`), weighted by a cosine ramp
   (:func:`sil_weight`).

Where the paper is vague this follows the authors' code (``verl-agent/verl/trainer/ppo/
ray_trainer_hybrid.py::TrajectoryBufferBatch``, ``workers/actor/dp_actor.py``, ``agent_system/
reward_manager/episode.py``, ``verl/recipe/spear/reward.py``); docs/spear.md lists each choice.
Everything with state keeps it as a plain, JSON-serialisable ``state_dict``.

The trainer's step, at step ``t``::

    rewards, m = shape_rewards(outcome, n_tool_calls, n_invalid, t)
    advantages = ...                                  # Dr.BoT GRPO on the on-policy batch
    replay = buffer.draw_replay()                     # None unless the trigger fires; flushes
    update(on-policy minibatches); update(replay minibatches, sil_loss(..., sil_weight(t)))
    buffer.add(t, trajectories, rewards, advantages, old_logprobs, loss_mask)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from agentrl.algos import drbot, losses
from agentrl.trajectory import Trajectory

Tensor = torch.Tensor
ToolCallSchedule = Literal["cosine", "constant", "none"]
ToolCallVariant = Literal["count", "qwen3"]


# -- curriculum 1: the tool-call reward -----------------------------------------------------------


def tool_call_weight(step: int, schedule: ToolCallSchedule = "cosine", decay_steps: int = 200) -> float:
    """``lambda_tc(t)``, the weight of the tool-call reward at step ``t``::

        cosine:    lambda_tc(t) = (cos(pi t / T_tc) + 1) / 2   for t <= T_tc,   0 after
        constant:  lambda_tc(t) = 1
        none:      lambda_tc(t) = 0

    ``T_tc = max_toolcall_steps = 200`` in every SPEAR script.
    """
    if schedule == "none":
        return 0.0
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown tool-call schedule {schedule!r}; use cosine, constant or none")
    if decay_steps <= 0:
        raise ValueError(f"the cosine tool-call schedule needs decay_steps > 0, not {decay_steps}; "
                         "use schedule 'none' or 'constant' for a fixed weight")
    if step < 0:
        raise ValueError(f"step must be >= 0, not {step}")
    if step > decay_steps:
        return 0.0
    return max(0.0, (math.cos(math.pi * step / decay_steps) + 1.0) / 2.0)


def tool_call_bonus(
    tool_call_counts: Tensor, outcome_rewards: Tensor | None = None, variant: ToolCallVariant = "count",
    per_call: float = 0.1, cap: float = 1.0,
) -> Tensor:
    """The tool-call reward before its weight, ``(B,)``::

        count:  r_tc = min(cap, per_call * n_tc)
        qwen3:  r_tc = min(cap, per_call * n_tc)   if R_out <= 0
                r_tc = 1[n_tc > 0]                 if R_out > 0

    ``qwen3`` is ``default_compute_score_enforce_toolcall_posneg_decay_qwen3`` of the math recipe: a
    correct answer earns the whole bonus for using the tool at all, so more calls pay only while the
    answer is wrong. ``R_out`` is the outcome reward before any shaping.
    """
    counts = tool_call_counts.double()
    if (counts < 0).any():
        raise ValueError("tool-call counts must be >= 0")
    bonus = torch.clamp(per_call * counts, max=cap)
    if variant == "count":
        return bonus
    if variant != "qwen3":
        raise ValueError(f"unknown tool-call reward variant {variant!r}; use count or qwen3")
    if outcome_rewards is None:
        raise ValueError("the qwen3 tool-call reward needs the outcome rewards")
    return torch.where(outcome_rewards.double() > 0, (counts > 0).double(), bonus)


def shape_rewards(
    outcome_rewards: Tensor,
    tool_call_counts: Tensor,
    invalid_actions: Tensor | None,
    step: int,
    *,
    schedule: ToolCallSchedule = "cosine",
    decay_steps: int = 200,
    variant: ToolCallVariant = "count",
    per_call: float = 0.1,
    cap: float = 1.0,
    invalid_action_penalty: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """SPEAR's shaped reward of each trajectory, ``(B,)``::

        R = R_out + lambda_tc(t) r_tc - c_inv n_invalid

    ``invalid_actions`` is ``(B,)``: a count of invalid actions (malformed tool calls,
    :func:`count_invalid_actions`) or a 0/1 format-error flag. ``c_inv = invalid_action_penalty_coef
    = 0.1`` is verl-agent's ``apply_invalid_action_penalty``, charged per invalid step; the paper's
    figure writes it as the reward ``0.1 1(every action is wrapped correctly)``, the same up to a
    constant. The shaped reward is what the buffer stores, so the bonus also enters the replay
    baseline, as in the authors' code. Returns the rewards and the metrics.
    """
    weight = tool_call_weight(step, schedule, decay_steps)
    bonus = tool_call_bonus(tool_call_counts, outcome_rewards, variant, per_call, cap)
    if bonus.shape != outcome_rewards.shape:
        raise ValueError(f"{tuple(outcome_rewards.shape)} rewards but {tuple(bonus.shape)} tool-call counts")
    penalty = torch.zeros_like(bonus)
    if invalid_actions is not None:
        penalty = invalid_action_penalty * invalid_actions.double()
        if penalty.shape != bonus.shape:
            raise ValueError(f"{tuple(outcome_rewards.shape)} rewards but {tuple(penalty.shape)} invalid-action counts")
    rewards = outcome_rewards.double() + weight * bonus - penalty
    metrics = {
        "spear/tool_call_weight": weight,
        "spear/tool_call_bonus": float((weight * bonus).mean()) if bonus.numel() else 0.0,
        "spear/invalid_action_penalty": float(penalty.mean()) if penalty.numel() else 0.0,
    }
    return rewards.to(outcome_rewards.dtype if outcome_rewards.is_floating_point() else torch.float32), metrics


def count_tool_call_turns(trajectory: Trajectory) -> int:
    """``n_tc`` as the math recipe counts it: assistant turns with at least one parsed tool call.
    Malformed calls (``status == "format_error"``) are not calls; they are invalid actions.
    (verl-agent counts environment steps instead, which in ALFWorld and WebShop is every turn.)"""
    return len({call.turn for call in trajectory.tool_calls if call.status != "format_error"})


def count_invalid_actions(trajectory: Trajectory) -> int:
    """Malformed tool calls, the invalid actions that :func:`shape_rewards` charges for."""
    return sum(1 for call in trajectory.tool_calls if call.status == "format_error")


# -- curriculum 2: the self-imitation loss --------------------------------------------------------


def sil_weight(step: int, coef: float = 1.0, ramp_steps: int = 200) -> float:
    """``w_sil(t)``, the weight of the self-imitation loss (``dp_actor.update_policy``)::

        w_sil(t) = c_sil (1 - cos(pi t / T_sil)) / 2   for t <= T_sil,   c_sil after

    ``c_sil = replay_loss_coef = 1`` in the scripts; ``T_sil = max_replay_loss_steps``, 300 in the
    math scripts and 200 (the yaml default) in verl-agent's, which set an ascending-steps variable
    they never pass. ``ramp_steps = 0`` means no ramp.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, not {step}")
    if ramp_steps < 0:
        raise ValueError(f"ramp_steps must be >= 0, not {ramp_steps}")
    if ramp_steps == 0 or step > ramp_steps:
        return float(coef)
    return float(coef) * (1.0 - math.cos(math.pi * step / ramp_steps)) / 2.0


def sil_loss(
    logprobs: Tensor,
    collection_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    weight: float,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_cov_ratio: float = 0.02,
    cov_lower: float = 2.0,
    cov_upper: float = 60.0,
    aggregation: str = "seq-mean-token-sum-norm",
    max_response_tokens: int | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    generator: torch.Generator | None = None,
    **totals: float | None,
) -> tuple[Tensor, dict[str, float]]:
    """The self-imitation loss on one replay (micro-)batch, ``(B, T)`` tensors::

        rho_t = exp(log pi_theta(a_t) - log pi_collect(a_t))
        L_sil = w_sil(t) [ ClipCov-PPO(rho, A~; eps_low, eps_high; r, omega_low, omega_high) - c_ent H ]

    ``collection_logprobs`` are the ``old_log_probs`` computed when the rows were collected (the
    buffer keeps them), so ``rho`` is a true off-policy ratio, clipped; no reference KL on replay
    (the authors comment it out). Clip-Cov (:func:`losses.clip_cov_loss`) runs with its replay
    parameters: ``r = 0.02`` (2% of tokens, 100x the on-policy 2e-4), band ``(2, 60)`` in
    verl-agent's scripts and ``(1, 40)`` in the math ones. The replayed advantages are ``>= 0``, so
    the dual clip (which acts only where ``A < 0``) has nothing to do here and is not applied, as
    in the authors' Clip-Cov loss. ``aggregation`` is any of :func:`drbot.aggregate`'s modes;
    ``totals`` are passed on (whole-minibatch normalisers). Returns the weighted loss and metrics.
    """
    token_loss, detached = losses.clip_cov_loss(
        logprobs, collection_logprobs, advantages, loss_mask, clip_low, clip_high,
        clip_cov_ratio, cov_lower, cov_upper, generator,
    )
    _, clipped = losses.ppo_clip_loss(logprobs.detach(), collection_logprobs, advantages, clip_low, clip_high,
                                      loss_mask=loss_mask)
    policy = drbot.aggregate(token_loss, loss_mask, aggregation, max_response_tokens=max_response_tokens, **totals)
    loss = policy
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * drbot.aggregate(entropy, loss_mask, aggregation,
                                                     max_response_tokens=max_response_tokens, **totals)
    log_ratio = (logprobs.detach() - collection_logprobs).clamp(-losses.LOG_RATIO_BOUND, losses.LOG_RATIO_BOUND)
    metrics = {
        "sil/loss": float(policy.detach()),
        "sil/weight": float(weight),
        "sil/clip_fraction": float(losses.masked_mean_scalar(clipped, loss_mask)),
        "sil/clip_cov_fraction": float(losses.masked_mean_scalar(detached, loss_mask)),
        "sil/ratio_mean": float(losses.masked_mean_scalar(log_ratio.exp(), loss_mask)),
    }
    return weight * loss, metrics


# -- the baseline memory D_R ----------------------------------------------------------------------


class BaselineMemory:
    """FIFO of per-group reward means and stds, one record per step (``reward_mean_history``).

    Before a step's record is appended, the oldest records are dropped while the stored group
    values number more than ``capacity`` (``baseline_buffer_size = 10240``): the authors' order,
    so the memory holds at most ``capacity`` plus one step's groups.
    """

    def __init__(self, capacity: int = 10240) -> None:
        if capacity <= 0:
            raise ValueError(f"the baseline memory needs capacity > 0, not {capacity}")
        self.capacity = capacity
        self.records: list[dict[str, Any]] = []  # {"step", "means", "stds"}

    def record(self, step: int, means: Sequence[float], stds: Sequence[float]) -> None:
        if len(means) != len(stds):
            raise ValueError(f"{len(means)} group means but {len(stds)} group stds")
        while self.records and self.size > self.capacity:
            self.records.pop(0)
        self.records.append({"step": int(step), "means": [float(v) for v in means], "stds": [float(v) for v in stds]})

    @property
    def size(self) -> int:
        return sum(len(record["means"]) for record in self.records)

    def median_mean(self) -> float | None:
        """``mu_50 = P50(D_R means)`` over every stored group (linear interpolation, as np.percentile)."""
        values = [v for record in self.records for v in record["means"]]
        return float(np.percentile(values, 50)) if values else None

    def median_std(self) -> float | None:
        """``sigma_50 = P50(D_R stds)``."""
        values = [v for record in self.records for v in record["stds"]]
        return float(np.percentile(values, 50)) if values else None

    def state_dict(self) -> dict[str, Any]:
        return {"records": copy.deepcopy(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = copy.deepcopy(list(state["records"]))


def group_statistics(rewards: Sequence[float], group_ids: Sequence[object]) -> tuple[list[float], list[float]]:
    """Each group's mean and population std (``np.std``, as verl-agent's ``update_batch``; the math
    copy uses torch's unbiased std), in order of first appearance."""
    members: dict[object, list[float]] = {}
    for reward, key in zip(rewards, group_ids, strict=True):
        members.setdefault(key, []).append(float(reward))
    return ([float(np.mean(v)) for v in members.values()], [float(np.std(v)) for v in members.values()])


def recalibrated_advantages(rewards: Tensor, memory: BaselineMemory, norm_std: bool = False,
                            eps: float = 1e-6) -> Tensor:
    """SPEAR's advantage recalibration of replayed rows (``prepare_for_selection``)::

        A~ = R - mu_50                     mu_50 = P50(group means in D_R)
        A~ = (R - mu_50) / (sigma_50 + eps)   with norm_std (off in SPEAR / Dr.BoT)

    One baseline for every row, whatever its group or step: a slowly moving percentile of recent
    group means instead of the row's own group mean, so a row that was good then but is only
    average now stops being imitated.
    """
    baseline_mean, baseline_std = memory.median_mean(), memory.median_std()
    if baseline_mean is None or baseline_std is None:
        raise ValueError("the baseline memory is empty: record at least one step's groups before recalibrating")
    advantages = rewards.double() - baseline_mean
    return advantages / (baseline_std + eps) if norm_std else advantages


# -- the replay buffer D --------------------------------------------------------------------------


@dataclass
class ReplayBatch:
    """Rows drawn for one replay: what the trainer needs to build their loss batch.

    ``trajectories`` give the token ids (collate them as any batch); ``old_logprobs`` and
    ``loss_masks`` index ``response_ids`` row by row (:meth:`token_tensors` pads them the way
    ``collate`` pads responses); ``advantages`` are the recalibrated ``A~ >= 0`` per row. Train
    with the stored loss mask (the trainer's mask at collection, after the Dr.BoT masks), not the
    trajectory's own.
    """

    trajectories: list[Trajectory]
    old_logprobs: list[list[float]]
    loss_masks: list[list[int]]
    rewards: Tensor  # (B,)
    advantages: Tensor  # (B,)
    steps: list[int]
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.trajectories)

    def token_tensors(self, width: int | None = None) -> tuple[Tensor, Tensor]:
        """``(old_logprobs, loss_mask)`` as ``(B, T)`` right-padded tensors (0 past each row)."""
        width = width if width is not None else max([len(row) for row in self.old_logprobs] + [1])
        old = torch.zeros((self.size, width))
        mask = torch.zeros((self.size, width))
        for row, (values, ones) in enumerate(zip(self.old_logprobs, self.loss_masks, strict=True)):
            if len(values) > width:
                raise ValueError(f"replay row {row} has {len(values)} response tokens; width {width} is too small")
            old[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
            mask[row, : len(ones)] = torch.tensor(ones, dtype=torch.float32)
        return old, mask


class ReplayBuffer:
    """SPEAR's self-imitation buffer (``TrajectoryBufferBatch`` with ``weight_decay_trajectory_replay
    = -1``, the P50 mode of every SPEAR script). ``capacity`` is ``N = trajectory_buffer_size``.

    - :meth:`add` (after the update of step ``t``, on that step's filtered batch): drop entries with
      ``t - step > max_staleness``; record the batch's group means and stds in the
      :class:`BaselineMemory`; store the rows with on-policy advantage ``A^ > 0`` and a non-empty
      loss mask (``require_tool_call``: and at least one tool call, as the math recipe), with their
      collection-time logprobs, shaped reward and step.
    - :meth:`replay_ready`: ``#{rows : R > mu_50} > 1.5 N``.
    - :meth:`draw_replay`: if ready, ``A~ = R - mu_50`` (``/ (sigma_50 + 1e-6)`` with
      ``norm_std``), keep ``A~ >= 0`` (``> 0`` with ``strict_positive``, as the math recipe), draw
      ``2^floor(log2 min(n, N))`` rows uniformly without replacement, and flush the buffer.
    """

    def __init__(self, capacity: int = 2048, max_staleness: int = 5, baseline_capacity: int = 10240,
                 trigger_factor: float = 1.5, norm_std: bool = False, strict_positive: bool = False,
                 require_tool_call: bool = False, min_rows: int = 1, seed: int = 0) -> None:
        if capacity <= 0 or max_staleness < 0 or trigger_factor <= 0 or min_rows < 1:
            raise ValueError("the replay buffer needs capacity > 0, max_staleness >= 0, trigger_factor > 0 and "
                             f"min_rows >= 1, not {capacity}, {max_staleness}, {trigger_factor}, {min_rows}")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.trigger_factor = trigger_factor
        self.norm_std = norm_std
        self.strict_positive = strict_positive
        self.require_tool_call = require_tool_call
        self.min_rows = min_rows
        self.memory = BaselineMemory(baseline_capacity)
        self.entries: list[dict[str, Any]] = []
        self.rng = np.random.default_rng(seed)
        self.replays = 0

    def __len__(self) -> int:
        return len(self.entries)

    # -- entry --------------------------------------------------------------------------------

    def add(self, step: int, trajectories: Sequence[Trajectory], rewards: Tensor, advantages: Tensor,
            old_logprobs: Tensor, loss_mask: Tensor, tool_call_counts: Tensor | None = None) -> int:
        """Store step ``step``'s positive rows; returns how many entered.

        ``rewards`` ``(B,)`` are the shaped rewards; ``advantages`` ``(B,)`` or ``(B, T)`` the
        on-policy ones (a row is positive when its masked advantage sum is, the sign of the
        authors' ``advantages.mean(-1)``); ``old_logprobs`` and ``loss_mask`` ``(B, T)`` index
        response tokens as the trainer's batch does. Every row counts towards the group baselines.
        """
        rows = len(trajectories)
        if rewards.shape != (rows,) or old_logprobs.shape[0] != rows or loss_mask.shape != old_logprobs.shape:
            raise ValueError(f"{rows} trajectories, rewards {tuple(rewards.shape)}, old logprobs "
                             f"{tuple(old_logprobs.shape)}, loss mask {tuple(loss_mask.shape)}: they must agree")
        if advantages.shape not in ((rows,), tuple(loss_mask.shape)):
            raise ValueError(f"advantages {tuple(advantages.shape)} must be ({rows},) or {tuple(loss_mask.shape)}")
        if not bool(torch.isfinite(rewards).all()):
            raise ValueError("rewards must be finite: a NaN or inf would poison the baseline memory's median")
        for trajectory in trajectories:  # checked before anything changes, so a bad call loses nothing
            if len(trajectory.response_ids) > loss_mask.shape[1]:
                raise ValueError(f"trajectory {trajectory.id} has {len(trajectory.response_ids)} response tokens; "
                                 f"the tensors only {loss_mask.shape[1]}")
        self.drop_stale(step)
        means, stds = group_statistics(rewards.tolist(), [t.group_id for t in trajectories])
        self.memory.record(step, means, stds)
        row_advantage = advantages if advantages.dim() == 1 else (advantages * (loss_mask > 0)).sum(-1)
        if tool_call_counts is None:
            tool_call_counts = torch.tensor([count_tool_call_turns(t) for t in trajectories])
        added = 0
        for row, trajectory in enumerate(trajectories):
            width = len(trajectory.response_ids)
            mask = loss_mask[row, :width]
            if float(row_advantage[row]) <= 0 or not bool((mask > 0).any()):
                continue
            if self.require_tool_call and int(tool_call_counts[row]) == 0:
                continue
            self.entries.append({
                "step": int(step),
                "reward": float(rewards[row]),
                "advantage": float(row_advantage[row]) if advantages.dim() == 1 else float(
                    row_advantage[row] / (mask > 0).sum()),
                "old_logprobs": [float(v) for v in old_logprobs[row, :width].tolist()],
                "loss_mask": [int(v > 0) for v in mask.tolist()],
                "trajectory": trajectory.to_dict(),
            })
            added += 1
        return added

    def drop_stale(self, step: int) -> int:
        """Drop entries more than ``max_staleness`` steps older than ``step``; returns how many."""
        before = len(self.entries)
        self.entries = [e for e in self.entries if step - e["step"] <= self.max_staleness]
        return before - len(self.entries)

    # -- trigger and draw ---------------------------------------------------------------------

    def rows_above_baseline(self) -> int:
        """``#{rows in D : R > mu_50}``, the authors' ``get_buffer_size`` in the P50 mode."""
        baseline = self.memory.median_mean()
        if baseline is None:  # add() records the memory before it stores, so this is an empty buffer
            return 0
        return sum(1 for entry in self.entries if entry["reward"] > baseline)

    def replay_ready(self) -> bool:
        return self.rows_above_baseline() > self.trigger_factor * self.capacity

    def draw_replay(self, step: int | None = None) -> ReplayBatch | None:
        """The replay batch when the trigger fires (then the buffer is flushed), else None.
        With the current ``step``, ``stats["age_mean"]`` is the mean age of the drawn rows.

        A triggered draw with fewer than ``min_rows`` rows (the authors: fewer than the number of
        GPUs) replays nothing but still flushes, as ``reset_buffer`` runs in either case.
        """
        if not self.replay_ready():
            return None
        entries = self.entries
        rewards = torch.tensor([e["reward"] for e in entries], dtype=torch.float64)
        advantages = recalibrated_advantages(rewards, self.memory, self.norm_std)
        keep = advantages > 0 if self.strict_positive else advantages >= 0
        kept = keep.nonzero().squeeze(-1).tolist()
        # The authors take min(2^floor(log2 n), N); with their N = 2048 that is this power of two.
        count = drbot.largest_power_of_two_at_most(min(len(kept), self.capacity))
        chosen = sorted(int(i) for i in self.rng.permutation(len(kept))[:count])
        rows = [kept[i] for i in chosen]
        self.entries = []
        self.replays += 1
        stats = {"candidates": float(len(entries)), "kept": float(len(kept)), "drawn": float(len(rows)),
                 "baseline_mean": self.memory.median_mean(), "baseline_std": self.memory.median_std()}
        if len(rows) < self.min_rows:
            rows = []
        if step is not None and rows:
            stats["age_mean"] = float(np.mean([step - entries[i]["step"] for i in rows]))
        return ReplayBatch(
            trajectories=[Trajectory.from_dict(copy.deepcopy(entries[i]["trajectory"])) for i in rows],
            old_logprobs=[list(entries[i]["old_logprobs"]) for i in rows],
            loss_masks=[list(entries[i]["loss_mask"]) for i in rows],
            rewards=rewards[rows].float(),
            advantages=advantages[rows].float(),
            steps=[entries[i]["step"] for i in rows],
            stats=stats,
        )

    # -- checkpoint ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Entries, baseline memory, RNG state and replay count: plain lists, dicts and numbers."""
        return {"entries": copy.deepcopy(self.entries), "memory": self.memory.state_dict(),
                "rng": copy.deepcopy(self.rng.bit_generator.state), "replays": self.replays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = copy.deepcopy(list(state["entries"]))
        self.memory.load_state_dict(state["memory"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.replays = int(state["replays"])


# -- per-step metrics -----------------------------------------------------------------------------


def replay_metrics(buffer: ReplayBuffer, replay: ReplayBatch | None) -> dict[str, float]:
    """Buffer size, rows above the baseline, the replay event and its batch, and the statistics of
    the recalibrated advantages (``spear/...``). Log after :meth:`ReplayBuffer.add`."""
    baseline = buffer.memory.median_mean()
    metrics = {
        "spear/buffer_rows": float(len(buffer)),
        "spear/buffer_rows_above_baseline": float(buffer.rows_above_baseline()),
        "spear/baseline_groups": float(buffer.memory.size),
        "spear/baseline_p50_mean": baseline if baseline is not None else 0.0,
        "spear/replays": float(buffer.replays),
        "spear/replay_event": float(replay is not None),
        "spear/replay_rows": float(replay.size) if replay is not None else 0.0,
    }
    if replay is not None:
        metrics["spear/replay_candidates"] = replay.stats.get("candidates", 0.0)
        metrics["spear/replay_kept"] = replay.stats.get("kept", 0.0)
        if replay.size:
            advantages = replay.advantages.double()
            metrics.update({
                "spear/replay_advantage_mean": float(advantages.mean()),
                "spear/replay_advantage_std": float(advantages.std(unbiased=False)),
                "spear/replay_advantage_min": float(advantages.min()),
                "spear/replay_advantage_max": float(advantages.max()),
            })
        if "age_mean" in replay.stats:
            metrics["spear/replay_age_mean"] = replay.stats["age_mean"]
    return metrics


def schedule_metrics(step: int, *, tool_call_schedule: ToolCallSchedule = "cosine", tool_call_steps: int = 200,
                     sil_coef: float = 1.0, sil_ramp_steps: int = 200) -> dict[str, float]:
    """The two schedules' values at ``step``: ``spear/tool_call_weight`` and ``spear/sil_weight``."""
    return {"spear/tool_call_weight": tool_call_weight(step, tool_call_schedule, tool_call_steps),
            "spear/sil_weight": sil_weight(step, sil_coef, sil_ramp_steps)}
