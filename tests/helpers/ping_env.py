"""A trivial tool-use task for trainer tests: calling the ``ping`` tool earns reward 1.

Demonstrations mix calling the tool with answering straight away, so a tiny model warm-started on
them does both about equally often and RL has something to improve.
"""

from __future__ import annotations

import json
from pathlib import Path

from agentrl.envs.base import Env, Reward, Task

from agentrl.tool import Tool

WORDS = ["apple", "river", "stone", "cloud", "maple", "ember", "delta", "orbit", "quartz", "willow", "cedar", "harbor"]


class PingTool(Tool):
    """Reply to a ping."""

    name = "ping"
    timeout = 5.0

    async def call(self, message: str) -> str:
        """
        Args:
            message: any text.
        """
        return "pong"


class PingEnv(Env):
    name = "ping"
    tools = ("tests.helpers.ping_env:PingTool",)
    action_format = "xml"
    tags = {"ping": "ping"}
    answer_tag = "answer"
    observation_template = "\n<pong>{observation}</pong>\n"
    final_turn_message = "\n<pong>done</pong>\n"

    def load(self, split, path=None):
        offset = 0 if split == "train" else 100
        return [{"id": f"{split}-{i}", "word": WORDS[(i + offset) % len(WORDS)]} for i in range(24 if split == "train" else 8)]

    def make_task(self, row, index):
        return Task(id=str(row["id"]), messages=[{"role": "user", "content": f"Ping {row['word']}."}], answer=row["word"])

    def reward(self, task, trajectory):
        pinged = any(call.tool == "ping" and call.status == "ok" for call in trajectory.tool_calls)
        return Reward(float(pinged), pinged)


def write_demonstrations(path: str | Path, count: int = 24) -> Path:
    """Half the chats ping then answer; half answer without the tool."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            messages = [{"role": "user", "content": f"Ping {WORDS[index % len(WORDS)]}."}]
            if index % 2 == 0:
                messages += [{"role": "assistant", "content": "<ping> hello </ping>"}, {"role": "tool", "content": "pong"},
                             {"role": "assistant", "content": "<answer> ok </answer>"}]
            else:
                messages += [{"role": "assistant", "content": "<answer> ok </answer>"}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path
