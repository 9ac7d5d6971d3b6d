"""The Env interface: what a task gives the rollout (prompt, tools, action format) and how it scores.

An env turns a dataset row into a :class:`Task` (chat messages, the gold answer, per-row metadata
such as a database path or images) and scores a finished trajectory with :meth:`Env.reward`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from agentrl.trajectory import Trajectory


@dataclass
class Task:
    """One dataset row, ready for a rollout."""

    id: str
    messages: list[dict[str, Any]]
    answer: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    images: list[Any] = field(default_factory=list)


@dataclass
class Reward:
    """A trajectory's score. ``success`` is what evaluation counts; ``turn_rewards`` feed
    turn-level credit assignment when the env defines them."""

    score: float
    success: bool = False
    turn_rewards: list[float] | None = None
    info: dict[str, float] = field(default_factory=dict)


class Env(ABC):
    """Base class for tasks. Subclasses set the class attributes and implement the three methods.

    ``action_format`` is ``"xml"`` (``<search>q</search>``: ``tags`` maps a tag to a tool name and
    ``observation_template`` wraps the tool output, e.g. ``<information>…</information>``) or
    ``"json"`` (hermes/Qwen ``<tool_call>{…}</tool_call>``; output goes back as a ``tool`` message
    through the chat template).
    """

    name: ClassVar[str] = "env"
    tools: ClassVar[tuple[str, ...]] = ()
    action_format: ClassVar[Literal["xml", "json"]] = "xml"
    tags: ClassVar[dict[str, str]] = {}
    answer_tag: ClassVar[str] = "answer"
    observation_template: ClassVar[str] = "\n<output>\n{observation}\n</output>\n"
    final_turn_message: ClassVar[str] = "You have no tool calls left. Give your final answer now."
    # The keys of ``env.options`` the env reads; a misspelt one is refused before a run starts.
    # ``None``: not declared, every option is passed through.
    option_names: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, **options: Any) -> None:
        self.options = options

    def load(self, split: Literal["train", "eval"], path: str | None = None) -> list[dict[str, Any]]:
        """Rows of the split: from ``path`` (JSONL or parquet) when given, else the env's own data."""
        if path is None:
            raise ValueError(f"env '{self.name}' has no built-in {split} data; set env.{split}_data")
        return load_rows(path)

    @abstractmethod
    def make_task(self, row: dict[str, Any], index: int) -> Task:
        """Turn a row into a task: messages (system + user), gold answer, metadata."""

    @abstractmethod
    def reward(self, task: Task, trajectory: Trajectory) -> Reward:
        """Score a finished trajectory (``trajectory.answer`` holds the parsed final answer)."""


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL or parquet file into a list of dicts."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: invalid JSON: {error}") from error
    return rows
