"""Trajectories: the token stream of one multi-turn rollout, its loss mask and what happened in it.

A trajectory is built from token ids exactly as the engine produced them (``loss_mask`` 1, sampled
logprobs kept) interleaved with observation and template tokens (``loss_mask`` 0). Nothing in it is
ever decoded and re-encoded. It round-trips losslessly through JSONL.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

Status = Literal[
    "ok", "format_error", "truncated",
    # Failures that are not the policy's: the trajectory is kept (with a short reason in
    # ``metadata["error"]``) but never enters the loss.
    "infra_error",  # a tool server, sandbox backend or inference server was unreachable
    "engine_error",  # the engine refused or failed the request (a 4xx such as a context-length error)
    "template_error",  # the chat template or tokenizer could not render the next piece
    "tool_error",  # a bug outside a tool's own call (its wrapper, its session) raised
    "reward_error",  # the env's reward function raised or ran past its timeout
]
STATUSES: tuple[str, ...] = (
    "ok", "format_error", "truncated", "infra_error", "engine_error", "template_error", "tool_error", "reward_error",
)
# Statuses that say nothing about the policy: left out of the loss and of group baselines.
FAILURE_STATUSES: frozenset[str] = frozenset({"infra_error", "engine_error", "template_error", "tool_error", "reward_error"})

StopReason = Literal[
    "answer",  # the model gave a final answer
    "eos",  # the model ended its turn without a tool call or an answer
    "max_turns",  # the turn budget ran out
    "max_new_tokens",  # one turn hit its per-turn token budget
    "max_response_tokens",  # the whole-trajectory token budget ran out
    "max_context",  # prompt + response reached the engine's context length
    "format_error",  # the episode was ended because of unparseable output
    "infra_error",  # a tool server or sandbox backend failed; excluded from the loss
    "engine_error", "template_error", "tool_error", "reward_error",  # see the statuses of the same names
    "stale",  # a partial rollout outlived the maximum staleness and was dropped
    "max_images",  # the next images would pass rollout.max_images or rollout.max_image_pixels
]
STOP_REASONS: tuple[str, ...] = (
    "answer", "eos", "max_turns", "max_new_tokens", "max_response_tokens", "max_context",
    "format_error", "infra_error", "engine_error", "template_error", "tool_error", "reward_error", "stale",
    "max_images",
)

SpanRole = Literal["assistant", "observation", "template"]


@dataclass
class TurnSpan:
    """A contiguous span of ``response_ids``: ``[start, end)``.

    ``assistant`` spans are sampled by the policy (loss mask 1); ``observation`` spans carry tool
    output and ``template`` spans chat-template glue (both loss mask 0). ``policy_version`` is the
    version of the weights that sampled an assistant span (partial rollouts mix versions).
    """

    role: SpanRole
    start: int
    end: int
    turn: int
    policy_version: int | None = None


@dataclass
class ToolCallRecord:
    """One tool call made in a trajectory, successful or not."""

    tool: str
    arguments: dict[str, Any]
    turn: int
    status: Literal["ok", "error", "timeout", "format_error", "infra_error"] = "ok"
    latency_s: float = 0.0
    error: str | None = None


@dataclass
class ImageRecord:
    """An image the model saw, in the order of its block of placeholder tokens in the stream.

    ``turn`` is -1 for the prompt's images, else the turn whose tool results held it. The image is
    ``data`` (base64 PNG, inline) or ``path`` (a file, by reference); ``inputs_sha256`` is the digest
    of its processed tensors (see :mod:`agentrl.multimodal`), so restoring them can be checked.
    """

    turn: int
    width: int
    height: int
    data: str | None = None
    path: str | None = None
    inputs_sha256: str | None = None


@dataclass
class Trajectory:
    """One rollout: ``prompt_ids`` followed by ``response_ids``.

    ``loss_mask``, ``logprobs`` and the span list all index ``response_ids``. ``logprobs[i]`` is the
    sampling log-probability of ``response_ids[i]`` for model tokens and 0.0 elsewhere.
    """

    id: str
    group_id: str
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[TurnSpan] = field(default_factory=list)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    stop_reason: StopReason | None = None
    status: Status = "ok"
    reward: float | None = None
    turn_rewards: list[float] | None = None
    policy_version: int = 0
    answer: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    images: list[ImageRecord] = field(default_factory=list)  # what a vision-language model saw

    # -- building --------------------------------------------------------------------------

    def append_model_tokens(
        self, token_ids: list[int], logprobs: list[float], turn: int, policy_version: int
    ) -> None:
        """Append tokens the policy sampled: trained on (mask 1), logprobs kept."""
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} logprobs")
        self._append(token_ids, 1, list(logprobs), "assistant", turn, policy_version)

    def append_observation_tokens(
        self, token_ids: list[int], turn: int, role: SpanRole = "observation"
    ) -> None:
        """Append tokens the policy did not sample (tool output, template glue): mask 0."""
        if role == "assistant":
            raise ValueError("observation tokens cannot have the assistant role")
        self._append(token_ids, 0, [0.0] * len(token_ids), role, turn, None)

    def _append(
        self,
        token_ids: list[int],
        mask_value: int,
        logprobs: list[float],
        role: SpanRole,
        turn: int,
        policy_version: int | None,
    ) -> None:
        if not token_ids:
            return
        start = len(self.response_ids)
        self.response_ids.extend(int(t) for t in token_ids)
        self.loss_mask.extend([mask_value] * len(token_ids))
        self.logprobs.extend(float(x) for x in logprobs)
        last = self.turns[-1] if self.turns else None
        if (
            last is not None
            and last.role == role
            and last.turn == turn
            and last.end == start
            and last.policy_version == policy_version
        ):
            last.end = len(self.response_ids)
        else:
            self.turns.append(TurnSpan(role, start, len(self.response_ids), turn, policy_version))

    # -- reading ---------------------------------------------------------------------------

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def num_turns(self) -> int:
        return len({s.turn for s in self.turns if s.role == "assistant"})

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def trainable(self) -> bool:
        """Failures that are not the policy's (:data:`FAILURE_STATUSES`), dropped partial rollouts
        and the members of a dropped group (``metadata["dropped"]``) never enter the loss."""
        return (self.status not in FAILURE_STATUSES and self.stop_reason != "stale"
                and not self.metadata.get("dropped"))

    def validate(self) -> None:
        """Raise ``ValueError`` if the parallel arrays or spans are inconsistent."""
        n = len(self.response_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"trajectory {self.id}: response_ids={n}, loss_mask={len(self.loss_mask)}, "
                f"logprobs={len(self.logprobs)}; they must be equal"
            )
        position = 0
        for span in self.turns:
            if span.start != position or span.end < span.start:
                raise ValueError(f"trajectory {self.id}: span {span} does not continue at {position}")
            expected = 1 if span.role == "assistant" else 0
            if any(m != expected for m in self.loss_mask[span.start : span.end]):
                raise ValueError(f"trajectory {self.id}: span {span} has a loss mask other than {expected}")
            position = span.end
        if position != n:
            raise ValueError(f"trajectory {self.id}: spans cover {position} of {n} response tokens")
        if self.status not in STATUSES:
            raise ValueError(f"trajectory {self.id}: unknown status {self.status!r}")
        if self.stop_reason is not None and self.stop_reason not in STOP_REASONS:
            raise ValueError(f"trajectory {self.id}: unknown stop reason {self.stop_reason!r}")

    # -- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown trajectory fields: {sorted(unknown)}")
        data = dict(data)
        data["turns"] = [TurnSpan(**s) for s in data.get("turns", [])]
        data["tool_calls"] = [ToolCallRecord(**c) for c in data.get("tool_calls", [])]
        data["images"] = [ImageRecord(**i) for i in data.get("images", [])]
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=True)

    @classmethod
    def from_json(cls, line: str) -> Trajectory:
        return cls.from_dict(json.loads(line))


def write_jsonl(trajectories: Iterable[Trajectory], path: str | Path, append: bool = False) -> int:
    """Write trajectories one per line; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("a" if append else "w", encoding="utf-8") as handle:
        for trajectory in trajectories:
            handle.write(trajectory.to_json() + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> Iterator[Trajectory]:
    """Read trajectories written by :func:`write_jsonl`; a malformed line names its number, and a
    torn last line (its writer was killed mid-line) is skipped with a warning."""
    return read_json_lines(path, Trajectory.from_json, "a trajectory")


def read_json_lines(path: str | Path, parse: Callable[[str], Any] = json.loads, what: str = "JSON") -> Iterator[Any]:
    """``parse`` of each non-empty line. Only the last line of a file can lack its newline, so a
    line that fails to parse without one is a torn write: warned about and skipped, never a crash.
    Any other bad line is an error naming its number."""
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield parse(raw.decode("utf-8"))
            except (ValueError, TypeError) as error:  # UnicodeDecodeError is a ValueError
                if not raw.endswith(b"\n"):
                    warnings.warn(f"{path}:{number}: skipping a torn last line ({len(raw)} bytes; its writer "
                                  "was interrupted)", stacklevel=2)
                    return
                raise ValueError(f"{path}:{number}: not {what}: {error}") from error
