"""Small real tools used by the executor and tool-server tests."""

import asyncio
import os
import time

from agentrl import InfraError, Tool, ToolError


class Sleeper(Tool):
    """Sleep, then say how long."""

    max_concurrency = 20
    timeout = 5.0

    async def call(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return f"slept {seconds}"


class Counter(Tool):
    """Count calls within one trajectory (per-trajectory state)."""

    async def setup(self, context):
        await super().setup(context)
        self.count = 0

    def call(self, step: int = 1) -> str:
        self.count += step
        return f"{self.context.trajectory_id}:{self.count}"


class Failing(Tool):
    """Fail in the way asked."""

    timeout = 0.3

    async def call(self, mode: str) -> str:
        if mode == "tool_error":
            raise ToolError("the file does not exist")
        if mode == "crash":
            raise ZeroDivisionError("division by zero")
        if mode == "infra":
            raise InfraError("backend down")
        if mode == "hang":
            await asyncio.sleep(10)
        if mode == "huge":
            return "x" * 100_000
        return "fine"


class Pid(Tool):
    """Report the serving process id."""

    def call(self, delay: float = 0.0) -> str:
        time.sleep(delay)
        return str(os.getpid())


class NoOp(Tool):
    """Do nothing."""

    async def call(self, x: int = 0) -> str:
        return "ok"


class ContextEcho(Tool):
    """Report the trajectory's context: its metadata and the sizes of its images."""

    def call(self, key: str = "db_path") -> str:
        sizes = [f"{image.size[0]}x{image.size[1]}" for image in self.context.images]
        return f"{key}={self.context.metadata.get(key)} images={sizes}"
