"""Faults for containment tests: an engine that refuses some requests, a tool whose result breaks
the executor's wrapper, and a reward function that raises or hangs, all on the ping task."""

from __future__ import annotations

import threading

from agentrl.engines.base import GenerationResult
from agentrl.engines.openai import EngineRequestError
from agentrl.tool import Observation, Tool
from tests.helpers.ping_env import PingEnv
from tests.helpers.scripted import ScriptedEngine

RELEASE = threading.Event()  # set it to let a hanging reward return


class BuggyPing(Tool):
    """Reply to a ping; ``bug`` returns an observation whose text is not text (a wrapper bug)."""

    name = "ping"
    timeout = 5.0

    async def call(self, message: str) -> Observation | str:
        """
        Args:
            message: any text.
        """
        if message.strip() == "bug":
            return Observation(text=None)  # type: ignore[arg-type]
        return "pong"


class FaultyEnv(PingEnv):
    """The ping task; a task whose word is ``reward-raises`` or ``reward-hangs`` breaks the reward
    of its sample 1."""

    name = "faulty"
    tools = ("tests.helpers.faulty:BuggyPing",)

    def reward(self, task, trajectory):
        if trajectory.id.endswith("/1") and task.answer == "reward-raises":
            raise KeyError("gold answer column missing")
        if trajectory.id.endswith("/1") and task.answer == "reward-hangs":
            RELEASE.wait(60)
        return super().reward(task, trajectory)


class FaultyEngine(ScriptedEngine):
    """Pings on even seeds and answers at once on odd ones (so rewards vary within a group).

    A prompt containing ``engine-fails`` is refused with a 400 the first ``engine_failures`` times;
    one containing ``tool-bug`` asks the tool for ``bug`` the first ``tool_bugs`` times."""

    def __init__(self, tokenizer, engine_failures: int = 1, tool_bugs: int = 1):
        super().__init__(tokenizer, None)
        self.engine_failures, self.tool_bugs = engine_failures, tool_bugs
        self.requests: dict[str, int] = {}

    async def generate(self, prompt_ids, params):
        text = self.tokenizer.decode(prompt_ids)
        for marker in ("engine-fails", "tool-bug"):
            if marker in text and "<pong>" not in text:
                self.requests[marker] = self.requests.get(marker, 0) + 1
        if "engine-fails" in text and self.engine_failures > 0:
            self.engine_failures -= 1
            raise EngineRequestError("http://127.0.0.1/v1/completions answered 400: This model's maximum context "
                                     "length is 2048 tokens")
        self.calls += 1
        ids = self.tokenizer.encode(self.decide(text, params.seed or 0), add_special_tokens=False)
        reason = "stop"
        if len(ids) > params.max_new_tokens:
            ids, reason = ids[: params.max_new_tokens], "length"
        return GenerationResult(ids, [-0.5] * len(ids), reason, None, self.policy_version)

    def decide(self, conversation: str, seed: int) -> str:
        if "<pong>" in conversation:
            return "<answer>done</answer>"
        if "tool-bug" in conversation and self.tool_bugs > 0:
            self.tool_bugs -= 1
            return "<ping>bug</ping>"
        return "<ping>hi</ping>" if (seed // 100) % 2 == 0 else "<answer>no</answer>"  # the trajectory seed's parity
