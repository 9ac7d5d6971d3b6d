"""Dr.BoT's pieces on hand-built cases: the four row masks (a 20-gram repeated 10 times, not 9),
the group filter that keeps the 75% of groups with the largest reward std trimmed to a power of
two, and the seq-mean-token-sum-norm aggregation."""

import pytest
import torch

from agentrl.algos.drbot import (
    aggregate,
    group_std_filter,
    has_repeated_ngram,
    is_incomplete,
    is_overlong,
    is_repetitive,
    is_unreadable,
    largest_power_of_two_at_most,
    masked_rows_loss_mask,
    row_flags,
    seq_mean_token_sum_norm,
)
from agentrl.algos.losses import aggregate_loss
from agentrl.trajectory import ToolCallRecord, Trajectory

BLOCK = list(range(100, 120))  # 20 distinct tokens


def trajectory_with_turns(*turns: list[int], answer: str | None = "42", status: str = "ok") -> Trajectory:
    trajectory = Trajectory(id="t", group_id="g", prompt_ids=[1], answer=answer, status=status)
    for turn, tokens in enumerate(turns):
        trajectory.append_model_tokens(tokens, [0.0] * len(tokens), turn=turn, policy_version=0)
        trajectory.append_observation_tokens([7, 8, 9], turn=turn)
    return trajectory


# -- repetition ----------------------------------------------------------------------------------


def test_a_20gram_repeated_10_times_is_repetitive_and_9_times_is_not():
    assert has_repeated_ngram(BLOCK * 10, n=20, threshold=10)
    assert not has_repeated_ngram(BLOCK * 9, n=20, threshold=10)
    assert not has_repeated_ngram(BLOCK * 9 + BLOCK[:19], n=20, threshold=10)  # the 10th copy is one short
    assert has_repeated_ngram([1, 2] + BLOCK * 10 + [3], n=20, threshold=10)
    assert not has_repeated_ngram(BLOCK[:5], n=20, threshold=10)


def test_repetition_is_counted_within_an_assistant_turn():
    assert is_repetitive(trajectory_with_turns([5, 6], BLOCK * 10))
    assert not is_repetitive(trajectory_with_turns(BLOCK * 9, [5, 6]))
    # the same 20 tokens opening each of ten turns (a tool call's fixed prefix) are not degenerate text
    assert not is_repetitive(trajectory_with_turns(*[BLOCK + [i] for i in range(10)]))


# -- unreadable, overlong, incomplete ------------------------------------------------------------


def test_unreadable_text_is_replacement_characters_or_cp1252_mojibake():
    assert is_unreadable("the answer is \ufffd")
    # UTF-8 read as cp1252: U+FFFD becomes "ï¿½", the fullwidth question mark "ï¼Ÿ"
    assert is_unreadable("caf" + "\ufffd".encode().decode("cp1252"))
    assert is_unreadable("why" + "？".encode().decode("cp1252"))
    assert not is_unreadable("plain text, ünïcode and 你好？ are readable")


def test_a_multibyte_character_cut_in_half_decodes_as_unreadable(tokenizer):
    ids = tokenizer.encode("你", add_special_tokens=False)
    assert len(ids) > 1, "the byte-level tokenizer should split this character into several tokens"
    assert is_unreadable(tokenizer.decode(ids[:1]))
    assert not is_unreadable(tokenizer.decode(ids))


def test_overlong_and_incomplete_rows():
    assert is_overlong(trajectory_with_turns([5], status="truncated"))
    assert not is_overlong(trajectory_with_turns([5]))
    assert not is_incomplete(trajectory_with_turns([5]))
    no_answer = trajectory_with_turns([5], answer=None)
    assert is_incomplete(no_answer)
    no_answer.tool_calls.append(ToolCallRecord("search", {}, 0))
    assert is_incomplete(no_answer)  # the authors' code masks it anyway
    assert not is_incomplete(no_answer, keep_tool_callers=True)
    malformed = trajectory_with_turns([5], answer=None)
    malformed.tool_calls.append(ToolCallRecord("", {}, 0, status="format_error"))
    assert is_incomplete(malformed, keep_tool_callers=True)  # a malformed call is not a tool call


def test_row_flags_mask_whole_rows_and_count_them(tokenizer):
    words = tokenizer.encode(" ".join(f"word{i}" for i in range(20)), add_special_tokens=False)[:20]
    plain = tokenizer.encode("fine", add_special_tokens=False)
    rows = [
        trajectory_with_turns(plain),
        trajectory_with_turns(plain, status="truncated", answer=None),
        trajectory_with_turns(words * 10),
        trajectory_with_turns(tokenizer.encode("你", add_special_tokens=False)[:1]),
    ]
    flags = row_flags(rows, tokenizer.decode)
    assert flags["overlong"].tolist() == [False, True, False, False]
    assert flags["incomplete"].tolist() == [False, True, False, False]
    assert flags["repetitive"].tolist() == [False, False, True, False]
    assert flags["unreadable"].tolist() == [False, False, False, True]
    loss_mask = torch.ones(4, 3)
    masked, metrics = masked_rows_loss_mask(loss_mask, flags)
    assert masked.tolist() == [[1.0] * 3] + [[0.0] * 3] * 3
    assert metrics["drbot/masked_rows"] == 3 and metrics["drbot/overlong_rows"] == 1
    masked, _ = masked_rows_loss_mask(loss_mask, flags, enabled=("repetitive",))
    assert masked.sum(-1).tolist() == [3.0, 3.0, 0.0, 3.0]
    with pytest.raises(ValueError, match="unknown Dr.BoT flags"):
        masked_rows_loss_mask(loss_mask, flags, enabled=("garbled",))


# -- the group filter ----------------------------------------------------------------------------


GROUPS = ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"] * 4
# population stds: a 0.5, b 0, c sqrt(0.75) = 0.866, d 0.5 (ties a; a comes first)
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])


def test_the_group_filter_keeps_the_75_percent_of_groups_with_the_largest_std_trimmed_to_a_power_of_two():
    kept, metrics = group_std_filter(REWARDS, GROUPS, 0.75, torch.Generator().manual_seed(0))
    # int(0.75 * 4) = 3 groups: c, a, d -> 12 rows -> 8 of them
    assert kept.numel() == 8
    assert {GROUPS[i] for i in kept.tolist()} <= {"a", "c", "d"}
    assert kept.tolist() == sorted(kept.tolist())
    assert metrics["drbot/group_std"] == pytest.approx((0.5 + 0 + 0.75**0.5 + 0.5) / 4)
    assert metrics["drbot/kept_group_std"] == pytest.approx((0.5 + 0.75**0.5 + 0.5) / 3)
    whole, _ = group_std_filter(REWARDS, GROUPS, 0.75, trim_to_power_of_two=False)
    assert whole.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]  # the math recipe: whole groups


def test_ties_in_group_std_go_to_the_group_seen_first():
    kept, _ = group_std_filter(REWARDS, GROUPS, 0.5, torch.Generator().manual_seed(0))
    # int(0.5 * 4) = 2 groups: c (0.866) and a (0.5, before d) -> 8 rows, a power of two already
    assert kept.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_the_trim_is_seeded_and_keep_ratio_one_returns_the_batch_untouched():
    first, _ = group_std_filter(REWARDS, GROUPS, 0.75, torch.Generator().manual_seed(5))
    again, _ = group_std_filter(REWARDS, GROUPS, 0.75, torch.Generator().manual_seed(5))
    assert first.tolist() == again.tolist()
    draws = {tuple(group_std_filter(REWARDS, GROUPS, 0.75, torch.Generator().manual_seed(s))[0].tolist())
             for s in range(6)}
    assert len(draws) > 1
    everything, _ = group_std_filter(REWARDS[:12], GROUPS[:12], 1.0)
    assert everything.tolist() == list(range(12))  # 12 rows: no power-of-two trim at ratio 1
    with pytest.raises(ValueError, match="keeps none"):
        group_std_filter(REWARDS[:4], GROUPS[:4], 0.75)
    with pytest.raises(ValueError, match="group ids"):
        group_std_filter(REWARDS, GROUPS[:3], 0.75)


def test_largest_power_of_two_at_most():
    assert [largest_power_of_two_at_most(n) for n in (0, 1, 2, 3, 8, 12, 2047, 2048)] == [0, 0, 2, 2, 8, 8, 1024, 2048]


# -- aggregation ---------------------------------------------------------------------------------


def test_seq_mean_token_sum_norm_divides_the_token_sum_by_the_max_response_length():
    token_loss = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = seq_mean_token_sum_norm(token_loss, mask, max_response_tokens=8)
    assert loss.item() == pytest.approx(7 / 8)
    loss.backward()
    assert token_loss.grad.tolist() == [[0.125, 0.125, 0.0], [0.125, 0.0, 0.0]]
    assert aggregate(token_loss, mask, "seq-mean-token-sum-norm", max_response_tokens=8).item() == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="max_response_tokens"):
        aggregate(token_loss, mask, "seq-mean-token-sum-norm")


def test_other_aggregations_are_those_of_the_losses_module():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        assert aggregate(token_loss, mask, mode).item() == aggregate_loss(token_loss, mask, mode).item()
    assert aggregate(token_loss, mask, "dr-grpo", max_response_tokens=4).item() == pytest.approx(7 / 8)
