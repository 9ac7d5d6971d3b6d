"""The tool executor: runs a turn's tool calls concurrently and turns every failure into something
the rollout can use.

*Tool errors* (bad arguments, unknown tools, exceptions, timeouts) become observations the model
sees. *Infrastructure errors* (:class:`~agentrl.tool.InfraError`: a tool server unreachable after
retries, a sandbox backend down) come back with status ``infra_error`` so the rollout can mark the
trajectory and keep it out of the loss.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import inspect
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from agentrl.parsing import ActionParser, ToolCall
from agentrl.tool import InfraError, Observation, Tool, ToolContext, ToolError, get_tool_class

ResultStatus = Literal["ok", "error", "timeout", "format_error", "infra_error"]


@dataclass
class ToolResult:
    call: ToolCall
    observation: Observation
    status: ResultStatus = "ok"
    latency_s: float = 0.0
    error: str | None = None


def truncate_text(text: str, max_chars: int) -> str:
    """Keep the head of an over-long output, with a visible marker of what was cut."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n[... {len(text) - max_chars} characters truncated ...]"


def truncate_observation(text: str, tokenizer: Any, max_tokens: int, side: str = "tail") -> str:
    """Fit an observation into ``max_tokens`` tokens, keeping the ``head``, the ``tail`` or both ends
    (``middle`` cuts the middle out), with a marker saying how many tokens were dropped."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    dropped = len(ids) - max_tokens
    marker = f"\n[... {dropped} tokens truncated ...]\n"
    if side == "head":
        return marker + tokenizer.decode(ids[-max_tokens:])
    if side == "tail":
        return tokenizer.decode(ids[:max_tokens]) + marker
    if side == "middle":
        head = max_tokens // 2
        return tokenizer.decode(ids[:head]) + marker + tokenizer.decode(ids[len(ids) - (max_tokens - head) :])
    raise ValueError(f"truncation side must be head, tail or middle, not {side!r}")


def _short_error(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[-1] if message else ''}".rstrip(": ")


@dataclass
class ToolExecutor:
    """Holds the tool classes of a run and the limits shared by all its trajectories."""

    tool_names: list[str]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    server_url: str | None = None
    token: str | None = None
    sync_workers: int = 16  # threads for synchronous tools, shared by all trajectories
    # names this executor's sessions on a tool server (default: a random secret per executor, so two
    # runs sharing a server never reach each other's sessions, whatever their trajectory ids)
    session_namespace: str | None = None

    def __post_init__(self) -> None:
        self.tool_classes: dict[str, type[Tool]] = {}
        for name in self.tool_names:
            cls = get_tool_class(name)
            self.tool_classes[cls.name] = cls
        self._semaphores: dict[tuple[int, str], asyncio.Semaphore] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._client = None
        if self.server_url:
            from agentrl.client import ToolServerClient

            self._client = ToolServerClient(self.server_url, token=self.token, namespace=self.session_namespace)

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [cls.schema() for cls in self.tool_classes.values()]

    def parser(self, format: str = "xml", tags: dict[str, str] | None = None, answer_tag: str | None = "answer") -> ActionParser:
        return ActionParser(format, tags, answer_tag, {cls.name: cls.schema() for cls in self.tool_classes.values()})

    def session(self, trajectory_id: str, context: ToolContext | None = None) -> ToolSession:
        return ToolSession(self, context or ToolContext(trajectory_id))

    def semaphore(self, cls: type[Tool]) -> asyncio.Semaphore | None:
        if not cls.max_concurrency:
            return None
        key = (id(asyncio.get_running_loop()), cls.name)
        if key not in self._semaphores:
            self._semaphores[key] = asyncio.Semaphore(cls.max_concurrency)
        return self._semaphores[key]

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The bounded pool synchronous tools run on. It is never the event loop's default pool,
        which engines use (a timed-out call keeps its thread: ``wait_for`` cannot stop a thread),
        so tools that hang can use up this pool but never starve generation."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.sync_workers, thread_name_prefix="agentrl-tool")
        return self._pool

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class ToolSession:
    """The tools of one trajectory: instances are created on first use and closed at the end."""

    def __init__(self, executor: ToolExecutor, context: ToolContext) -> None:
        self.executor = executor
        self.context = context
        self._instances: dict[str, Tool] = {}
        self._setup_locks: dict[str, asyncio.Lock] = {}
        self._remote: tuple[dict[str, Any], list[str]] | None = None

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return self.executor.schemas

    async def __aenter__(self) -> ToolSession:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Run calls concurrently; results come back in call order."""
        return list(await asyncio.gather(*(self._run_one(call) for call in calls)))

    async def close(self) -> None:
        instances, self._instances = self._instances, {}
        for instance in instances.values():
            try:
                await instance.close()
            except Exception:  # closing one tool must not leak the others
                pass
        if self.executor._client is not None:
            try:
                await self.executor._client.release(self.context.trajectory_id)
            except InfraError:
                pass

    # -- one call ---------------------------------------------------------------------------

    async def _run_one(self, call: ToolCall) -> ToolResult:
        started = time.perf_counter()
        cls = self.executor.tool_classes.get(call.tool)
        if cls is None:
            known = list(self.executor.tool_classes)
            close = difflib.get_close_matches(call.tool, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            message = f"unknown tool '{call.tool}'.{hint} Available tools: {', '.join(known)}."
            return ToolResult(call, Observation(message), "format_error", 0.0, message)
        try:
            arguments = cls.validate_arguments(call.arguments)
            if self.executor._client is not None:
                metadata, images = self._remote_context()
                observation = await self.executor._client.call(
                    self.context.trajectory_id, call.tool, call.arguments, cls.timeout, metadata, images
                )
            else:
                observation = await self._call_local(cls, arguments)
            status, error = "ok", None
        except ToolError as exc:
            observation, status, error = Observation(f"Error: {exc}"), "error", str(exc)
        except asyncio.TimeoutError:
            error = f"the call to '{cls.name}' timed out after {cls.timeout:g} s"
            observation, status = Observation(f"Error: {error}."), "timeout"
        except InfraError as exc:
            observation, status, error = Observation(f"Error: tool infrastructure failed: {exc}"), "infra_error", str(exc)
        except Exception as exc:  # a crashed tool is an observation, never a crashed rollout
            error = _short_error(exc)
            observation, status = Observation(f"Error: {error}"), "error"
        observation.text = truncate_text(observation.text, cls.max_output_chars)
        return ToolResult(call, observation, status, time.perf_counter() - started, error)

    def _remote_context(self) -> tuple[dict[str, Any], list[str]]:
        """The context as the tool server receives it: JSON-safe metadata (paths become strings)
        and the images as base64 PNG, encoded once per trajectory."""
        if self._remote is None:
            from agentrl.client import encode_image

            metadata = json.loads(json.dumps(self.context.metadata, default=str))
            self._remote = (metadata, [encode_image(image) for image in self.context.images])
        return self._remote

    async def _call_local(self, cls: type[Tool], arguments: dict[str, Any]) -> Observation:
        instance = await self._instance(cls)
        semaphore = self.executor.semaphore(cls)
        if semaphore is None:
            return await asyncio.wait_for(_invoke(instance, arguments, self.executor.pool), cls.timeout)
        async with semaphore:
            return await asyncio.wait_for(_invoke(instance, arguments, self.executor.pool), cls.timeout)

    async def _instance(self, cls: type[Tool]) -> Tool:
        lock = self._setup_locks.setdefault(cls.name, asyncio.Lock())
        async with lock:
            if cls.name not in self._instances:
                instance = cls(**self.executor.options.get(cls.name, {}))
                await instance.setup(self.context)
                self._instances[cls.name] = instance
        return self._instances[cls.name]


async def _invoke(instance: Tool, arguments: dict[str, Any], pool: ThreadPoolExecutor) -> Observation:
    call = instance.call  # type: ignore[attr-defined]
    if inspect.iscoroutinefunction(call):
        value = await call(**arguments)
    else:
        value = await asyncio.get_running_loop().run_in_executor(pool, functools.partial(call, **arguments))
    return to_observation(value)


def to_observation(value: Any) -> Observation:
    if isinstance(value, Observation):
        return value
    if value is None:
        return Observation("")
    if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image
        return Observation("", [value])
    return Observation(value if isinstance(value, str) else str(value))
