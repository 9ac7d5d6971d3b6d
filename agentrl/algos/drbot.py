"""Dr.BoT, the "bag of tricks" GRPO baseline of SPEAR (Tencent Youtu, arXiv 2509.22601, sec. 4):
pure functions for its loss masks, its group filter and its loss aggregation.

The rest of Dr.BoT is settings of the existing pieces (:data:`DRBOT_SETTINGS`): no KL to the
reference, clip-higher ``eps_low = 0.2``, ``eps_high = 0.28``, dual clip ``c = 10``, GRPO without the
std division (:func:`agentrl.algos.advantages.dr_grpo_advantages`) and the
``seq-mean-token-sum-norm`` aggregation (:func:`seq_mean_token_sum_norm`).

Which rows a mask drops follows the authors' code (``verl-agent/agent_system/reward_manager/
episode.py`` and ``ray_trainer_hybrid.py``): a flagged row keeps its reward and its place in the
group baseline, only its tokens leave the loss (``response_mask`` set to 0).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch

from agentrl.algos import losses
from agentrl.trajectory import Trajectory

Tensor = torch.Tensor

# The Dr.BoT loss settings in the authors' scripts (run_*_drbot.sh and run_*_spear.sh).
DRBOT_SETTINGS: dict[str, object] = {
    "kl_coef": 0.0,  # use_kl_loss = use_kl_in_reward = False
    "clip_low": 0.2,
    "clip_high": 0.28,
    "dual_clip": 10.0,  # clip_ratio_c
    "norm_std": False,  # norm_adv_by_std_in_grpo
    "loss_agg": "seq-mean-token-sum-norm",
    "group_keep_ratio": 0.75,  # rollout_filter_ratio, rollout_filter_type = std
    "ngram": 20,
    "ngram_repeats": 10,
}

# Mojibake the authors' code looks for in the decoded response (episode.py): U+FFFD, the
# replacement character a tokenizer emits for bytes that are not UTF-8, and the same character and
# the fullwidth "?" (U+FF1F) read as cp1252. Their longer markers ("Ġï¿½", "ï¿½ï¿½") contain these.
UNREADABLE_MARKERS: tuple[str, ...] = ("\ufffd", "ï¿½", "ï¼Ÿ")


# -- aggregation ---------------------------------------------------------------------------------


def seq_mean_token_sum_norm(token_loss: Tensor, loss_mask: Tensor, max_response_tokens: int) -> Tensor:
    """verl's ``seq-mean-token-sum-norm`` (the Dr.GRPO normaliser as verl writes it)::

        L = sum_{i,t} m_{i,t} l_{i,t} / L_max

    with the constant ``L_max = max_response_tokens`` (verl divides by the padded width of the
    response tensor, which is ``max_response_length`` there). verl then divides each micro-batch's
    loss by the number of micro-batches, so over a minibatch of ``B`` rows in micro-batches of ``m``
    its gradient is ``m / (B L_max) sum l``: ``m`` times :func:`losses.aggregate_loss`'s
    ``dr-grpo``. This function is the per-micro-batch formula; the trainer's accumulation divisor
    decides which of the two scales results. Masked tokens contribute nothing, even as ``0 * inf``.
    """
    if max_response_tokens <= 0:
        raise ValueError(f"seq-mean-token-sum-norm needs max_response_tokens > 0, not {max_response_tokens}")
    masked = torch.where(loss_mask > 0, token_loss, torch.zeros_like(token_loss))
    return masked.sum() / max_response_tokens


def aggregate(token_loss: Tensor, loss_mask: Tensor, mode: str, *, max_response_tokens: int | None = None,
              **totals: float | None) -> Tensor:
    """:func:`losses.aggregate_loss` plus ``seq-mean-token-sum-norm``, which ``losses`` does not have."""
    if mode == "seq-mean-token-sum-norm":
        if max_response_tokens is None:
            raise ValueError("the seq-mean-token-sum-norm aggregation needs max_response_tokens "
                             "(rollout.max_response_tokens)")
        return seq_mean_token_sum_norm(token_loss, loss_mask, max_response_tokens)
    return losses.aggregate_loss(token_loss, loss_mask, mode, max_response_tokens=max_response_tokens, **totals)


# -- row flags -----------------------------------------------------------------------------------


def has_repeated_ngram(token_ids: Sequence[int], n: int = 20, threshold: int = 10) -> bool:
    """True when some ``n``-gram of ``token_ids`` occurs at least ``threshold`` times (overlapping
    occurrences count), as ``has_repeated_ngrams`` in the authors' ``episode.py``."""
    if n <= 0 or threshold <= 0:
        raise ValueError(f"n and threshold must be positive, not n={n}, threshold={threshold}")
    if len(token_ids) < n:
        return False
    counts = Counter(tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1))
    return max(counts.values()) >= threshold


def assistant_turn_tokens(trajectory: Trajectory) -> list[list[int]]:
    """The model tokens of each assistant turn (a turn split over several spans is joined)."""
    turns: dict[int, list[int]] = {}
    for span in trajectory.turns:
        if span.role == "assistant":
            turns.setdefault(span.turn, []).extend(trajectory.response_ids[span.start : span.end])
    return [turns[turn] for turn in sorted(turns)]


def is_repetitive(trajectory: Trajectory, n: int = 20, threshold: int = 10) -> bool:
    """A 20-gram repeated 10 times within one assistant turn.

    The authors count n-grams over one training row, which in verl-agent is one environment turn
    (the model's action, no observation). Counting per turn keeps that meaning here, where a row is
    a whole trajectory: ten turns that open the same tool call (``<tool_call>{"name": "search", ...``
    is close to 20 tokens) are not degenerate text, and n-grams never straddle an observation.
    """
    return any(has_repeated_ngram(tokens, n, threshold) for tokens in assistant_turn_tokens(trajectory))


def is_unreadable(text: str) -> bool:
    """Garbled output: the decoded text holds U+FFFD (bytes that are not valid UTF-8, which the
    tokenizer's decode replaces) or one of the cp1252 mojibake sequences of :data:`UNREADABLE_MARKERS`."""
    return any(marker in text for marker in UNREADABLE_MARKERS)


def is_overlong(trajectory: Trajectory) -> bool:
    """Stopped by a token budget (per turn, whole trajectory or context): the rollout marks those
    ``status = "truncated"``. The authors flag a row whose response reached ``max_response_length``."""
    return trajectory.status == "truncated"


def is_incomplete(trajectory: Trajectory, keep_tool_callers: bool = False) -> bool:
    """No final answer (verl-agent: no ``<action>...</action>``; math: no extractable answer).

    ``keep_tool_callers=True`` keeps rows that called a tool without answering, as the comment in
    the authors' math reward says is intended ("called a tool but gave no final answer: keep this
    negative sample"); their code does not do it (the assignment there sets ``is_incomplete = 0``
    only when it already is 0), so the default follows the code.
    """
    if trajectory.answer is not None:
        return False
    return not (keep_tool_callers and any(call.status != "format_error" for call in trajectory.tool_calls))


def row_flags(
    trajectories: Sequence[Trajectory],
    decode: Callable[[list[int]], str],
    *,
    n: int = 20,
    threshold: int = 10,
    keep_tool_callers: bool = False,
) -> dict[str, Tensor]:
    """The four Dr.BoT flags of each row as ``(B,)`` bool tensors: ``overlong``, ``incomplete``,
    ``repetitive`` and ``unreadable``. ``decode`` turns token ids into text (the tokenizer's
    ``decode``); each assistant turn is decoded on its own, so no observation text is judged."""
    flags: dict[str, list[bool]] = {"overlong": [], "incomplete": [], "repetitive": [], "unreadable": []}
    for trajectory in trajectories:
        flags["overlong"].append(is_overlong(trajectory))
        flags["incomplete"].append(is_incomplete(trajectory, keep_tool_callers))
        flags["repetitive"].append(is_repetitive(trajectory, n, threshold))
        flags["unreadable"].append(any(is_unreadable(decode(tokens)) for tokens in assistant_turn_tokens(trajectory)))
    return {name: torch.tensor(values, dtype=torch.bool) for name, values in flags.items()}


def masked_rows_loss_mask(loss_mask: Tensor, flags: dict[str, Tensor],
                          enabled: Sequence[str] = ("overlong", "incomplete", "repetitive", "unreadable"),
                          ) -> tuple[Tensor, dict[str, float]]:
    """Zero the loss mask of every row with an enabled flag::

        m'_{i,t} = m_{i,t} * prod_{f in enabled} (1 - f_i)

    Returns the new ``(B, T)`` mask and the count of rows each flag removed (``drbot/<flag>_rows``,
    as the authors' ``<flag>_responses`` metrics; a row may carry several flags).
    """
    unknown = set(enabled) - set(flags)
    if unknown:
        raise ValueError(f"unknown Dr.BoT flags {sorted(unknown)}; known: {sorted(flags)}")
    drop = torch.zeros(loss_mask.shape[0], dtype=torch.bool)
    metrics: dict[str, float] = {}
    for name in enabled:
        flag = flags[name].bool()
        if flag.shape != drop.shape:
            raise ValueError(f"flag {name!r} has shape {tuple(flag.shape)}; the loss mask has {loss_mask.shape[0]} rows")
        drop |= flag
        metrics[f"drbot/{name}_rows"] = float(flag.sum())
    metrics["drbot/masked_rows"] = float(drop.sum())
    return loss_mask * (~drop).unsqueeze(-1).to(loss_mask.dtype), metrics


# -- the group filter ----------------------------------------------------------------------------


def largest_power_of_two_at_most(count: int) -> int:
    """``2^floor(log2 count)``, and 0 for fewer than two rows (the authors return -1 there, which
    their slice ``[:-1]`` turns into "keep none" for one row; 0 says the same plainly)."""
    return 0 if count <= 1 else 1 << (count.bit_length() - 1)


def group_std_filter(
    rewards: Tensor, group_ids: Tensor | Sequence[object], keep_ratio: float = 0.75,
    generator: torch.Generator | None = None, trim_to_power_of_two: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """Dr.BoT's rollout filter (``ray_trainer.py::_filter_rollout``, type ``std``).

    1. Per group ``g``: the population std ``sigma_g`` (numpy's ``np.std``) of its rewards.
    2. Keep the ``floor(keep_ratio * G)`` groups with the largest ``sigma_g`` (ties: the group seen
       first wins, as Python's stable sort there).
    3. Of their rows, a uniformly random subset of ``2^floor(log2 n)`` rows (seeded by
       ``generator``) is kept, so the batch splits evenly; a group may lose some of its rows.
       (verl-agent trims because its rows are environment turns, uneven in number per group; the
       math recipe's copy keeps the chosen groups whole: ``trim_to_power_of_two=False``.)

    Returns the sorted indices of the kept rows and metrics (the mean std before and after).
    """
    rewards = rewards.double().flatten()
    keys = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(keys) != rewards.numel():
        raise ValueError(f"{rewards.numel()} rewards but {len(keys)} group ids")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], not {keep_ratio}")
    members: dict[object, list[int]] = {}
    for row, key in enumerate(keys):
        members.setdefault(key, []).append(row)
    stds = {key: float(rewards[rows].std(unbiased=False)) for key, rows in members.items()}
    metrics = {"drbot/group_std": sum(stds.values()) / max(len(stds), 1)}
    if keep_ratio == 1.0:  # the authors return the batch untouched, without the power-of-two trim
        metrics["drbot/kept_group_std"] = metrics["drbot/group_std"]
        return torch.arange(rewards.numel()), metrics
    keep_groups = int(keep_ratio * len(members))
    if keep_groups == 0:
        raise ValueError(f"keep_ratio={keep_ratio} keeps none of {len(members)} groups; "
                         "raise it or sample more groups per step")
    chosen = sorted(members, key=lambda key: stds[key], reverse=True)[:keep_groups]
    rows = torch.tensor(sorted(row for key in chosen for row in members[key]), dtype=torch.long)
    keep = largest_power_of_two_at_most(rows.numel()) if trim_to_power_of_two else rows.numel()
    kept = rows[torch.randperm(rows.numel(), generator=generator)[:keep]].sort().values
    metrics["drbot/kept_group_std"] = sum(stds[key] for key in chosen) / keep_groups
    metrics["drbot/kept_rows"] = float(kept.numel())
    return kept, metrics
