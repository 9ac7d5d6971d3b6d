"""The tool server: tool calls over HTTP, keyed by trajectory, for rollouts that run elsewhere.

``POST /call`` takes a batch ``{"requests": [{"trajectory_id", "tool", "arguments"}, ...]}`` and
answers ``{"results": [{"status", "text", "images", "latency_s", "error"}, ...]}`` in request order.
Tool instances are sticky per trajectory (a Python session survives between turns), evicted after
an idle TTL or on ``POST /release``. A session is named by the request's ``namespace`` (a random
secret each client draws, so two runs sharing a server never reach each other's sessions, even
with the same trajectory ids) and its ``trajectory_id``. A request with ``resume: true`` continues a session the
client already used; when the server has no such session (it restarted or evicted it) the answer
is ``session_restarted`` instead of a silently fresh one. A repeated ``Idempotency-Key`` gets the
first answer again instead of running the calls twice. ``/health`` and ``/metrics`` (Prometheus
text) are open; every other route needs the bearer token when one is set, checked before the body
is read. Bodies, batch sizes, live sessions and decoded image pixels are bounded, and so are the
tool calls executing at once across all sessions (:class:`_CallSlots`: more wait in a bounded
queue, beyond it 429 with ``Retry-After``). Binds 127.0.0.1
unless told otherwise, and refuses a non-loopback address without a token (:func:`check_bind`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import ipaddress
import json
import secrets
import time
from typing import Any

from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field

from agentrl.client import encode_image, open_images
from agentrl.executor import ToolExecutor, ToolSession
from agentrl.parsing import ToolCall
from agentrl.tool import ToolContext

MAX_BATCH = 256
MAX_NAMESPACE = 128


class CallRequest(BaseModel):
    trajectory_id: str = Field(min_length=1, max_length=256)
    namespace: str = Field("", max_length=MAX_NAMESPACE)  # the client's secret session namespace
    tool: str = Field(max_length=256)
    arguments: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    images: list[str] = Field([], max_length=64)  # base64 images: the task's, used when the session starts
    resume: bool = False  # the client used this trajectory's session before: never start it afresh


class BatchRequest(BaseModel):
    requests: list[CallRequest] = Field(min_length=1, max_length=MAX_BATCH)


class ReleaseRequest(BaseModel):
    trajectory_id: str = Field(max_length=256)
    namespace: str = Field("", max_length=MAX_NAMESPACE)


class CallResult(BaseModel):
    status: str
    text: str
    images: list[str]
    latency_s: float
    error: str | None


class BatchResponse(BaseModel):
    results: list[CallResult]


class ReleaseResponse(BaseModel):
    released: bool


class HealthResponse(BaseModel):
    status: str
    tools: list[str]
    sessions: int


class ToolsResponse(BaseModel):
    tools: list[dict[str, Any]]


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class InsecureBind(ValueError):
    """A server was asked to listen beyond loopback with no token."""


def check_bind(host: str, token: str | None, insecure: bool = False, service: str = "server") -> None:
    """Refuse to serve on a non-loopback address without a bearer token, unless told ``insecure``."""
    if token or insecure or is_loopback(host):
        return
    raise InsecureBind(
        f"refusing to serve the {service} on {host} without a bearer token: anyone who can reach that "
        "address could use it. Set --token (or AGENTRL_SERVER_TOKEN), bind 127.0.0.1, or pass "
        "--insecure if every client on that network is trusted"
    )


def invalid(loc: list[Any], message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, as the API schema documents them."""
    return HTTPException(422, [{"loc": loc, "msg": message, "type": "value_error"}])


async def _send_json(send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    response = JSONResponse(body, status_code=status, headers=headers)
    await response({"type": "http"}, None, send)


class BearerAuth:
    """Require ``Authorization: Bearer <token>`` on every route but the open ones, before the body
    is read. The header is compared as bytes in constant time, so any malformed or non-ASCII value
    is simply a 401."""

    def __init__(self, app, token: str | None, open_paths: tuple[str, ...] = ("/health", "/metrics")) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.expected is None or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        supplied = dict(scope["headers"]).get(b"authorization", b"")
        if not secrets.compare_digest(supplied, self.expected):
            return await _send_json(send, 401, {"detail": "missing or wrong bearer token"},
                                    {"WWW-Authenticate": "Bearer"})
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over a size limit with 413, whether or not they declare a length.

    A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which costs a task per request).
    When a streamed (chunked) body passes the limit, whatever the app would answer to the cut body
    is dropped and the answer is 413."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        try:
            too_long = declared is not None and int(declared) > self.max_body_bytes
        except ValueError:
            return await _send_json(send, 400, {"detail": "Content-Length is not a number"})
        if too_long:
            return await self._refuse(send)
        received = 0
        over = False
        started = False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                over = True
                raise _TooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return  # the app's answer to a cut body; the 413 goes out instead
            started = True
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if over and not started:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        await _send_json(send, 413, {"detail": f"request body over {self.max_body_bytes} bytes"})


class _TooLarge(Exception):
    pass


class SessionsFull(Exception):
    pass


SessionKey = tuple[str, str]  # (namespace, trajectory_id)


class _Sessions:
    """Sticky tool sessions keyed by ``(namespace, trajectory_id)``, with idle-TTL eviction and a cap
    on how many live. The tools see only the trajectory id; the namespace never leaves the server."""

    def __init__(self, executor: ToolExecutor, idle_ttl_s: float, max_sessions: int) -> None:
        self.executor = executor
        self.idle_ttl_s = idle_ttl_s
        self.max_sessions = max_sessions
        self.sessions: dict[SessionKey, tuple[ToolSession, float]] = {}

    def get(self, key: SessionKey) -> ToolSession | None:
        entry = self.sessions.get(key)
        if entry is None:
            return None
        self.sessions[key] = (entry[0], time.monotonic())
        return entry[0]

    def start(self, key: SessionKey, metadata: dict[str, Any], images: list[Any]) -> ToolSession:
        session = self.get(key)
        if session is not None:  # another call of the batch started it meanwhile
            return session
        if len(self.sessions) >= self.max_sessions:
            raise SessionsFull()
        trajectory_id = key[1]
        session = self.executor.session(trajectory_id, ToolContext(trajectory_id, metadata, images))
        self.sessions[key] = (session, time.monotonic())
        return session

    async def release(self, key: SessionKey) -> bool:
        entry = self.sessions.pop(key, None)
        if entry:
            await entry[0].close()
        return entry is not None

    async def evict_idle(self) -> int:
        now = time.monotonic()
        idle = [key for key, (_, used) in self.sessions.items() if now - used > self.idle_ttl_s]
        for key in idle:
            await self.release(key)
        return len(idle)

    async def close(self) -> None:
        for key in list(self.sessions):
            await self.release(key)


class _CallSlots:
    """A global bound on tool calls: at most ``running`` execute at once across all sessions, and at
    most ``queued`` more wait for a slot. A batch whose calls would take the admitted ones past
    ``running + queued`` is refused whole (429) before any of its calls runs, so a client's retry
    never repeats part of it; an admitted call waits at most for the calls ahead of it, each bounded
    by its tool's timeout. A synchronous tool that overruns its timeout frees its slot, while its
    thread finishes in the executor's bounded pool."""

    def __init__(self, running: int, queued: int) -> None:
        if running < 1 or queued < 0:
            raise ValueError(f"need at least one running call and no negative queue, not {running} and {queued}")
        self.running, self.queued = running, queued
        self.semaphore = asyncio.Semaphore(running)
        self.admitted = 0  # running plus waiting
        self.active = 0

    @property
    def capacity(self) -> int:
        return self.running + self.queued

    def admit(self, count: int) -> bool:
        if self.admitted + count > self.capacity:
            return False
        self.admitted += count
        return True

    def release(self, count: int = 1) -> None:
        self.admitted -= count

    @contextlib.asynccontextmanager
    async def running_slot(self):
        """Wait for, then hold, one of the ``running`` slots."""
        async with self.semaphore:
            self.active += 1
            try:
                yield
            finally:
                self.active -= 1


class _Replies:
    """Answers by idempotency key: a repeated key (a retry) awaits or reuses the first attempt's
    work instead of running the calls again. Bounded by count and age."""

    def __init__(self, max_entries: int = 1024, ttl_s: float = 300.0) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.entries: collections.OrderedDict[str, tuple[str, float, asyncio.Future]] = collections.OrderedDict()

    async def run(self, key: str | None, digest: str, work) -> Any:
        if key is None:
            return await work()
        now = time.monotonic()
        while self.entries and (len(self.entries) >= self.max_entries
                                or now - next(iter(self.entries.values()))[1] > self.ttl_s):
            self.entries.popitem(last=False)
        if key in self.entries:
            known, _, task = self.entries[key]
            if known != digest:
                raise invalid(["header", "idempotency-key"], "this Idempotency-Key was used for a different request")
        else:
            task = asyncio.ensure_future(work())  # survives a client that disconnects mid-call
            self.entries[key] = (digest, now, task)
        try:
            return await asyncio.shield(task)
        except Exception:  # a failure (429, 422) is not remembered: the retry runs afresh
            if key in self.entries and self.entries[key][2] is task:
                del self.entries[key]
            raise


def create_app(
    tool_names: list[str],
    options: dict[str, dict[str, Any]] | None = None,
    token: str | None = None,
    idle_ttl_s: float = 600.0,
    max_body_bytes: int = 4 * 1024 * 1024,
    max_sessions: int = 4096,
    max_request_pixels: int = 64_000_000,
    max_concurrent_calls: int = 64,
    max_queued_calls: int = 1024,
) -> FastAPI:
    """``max_request_pixels``: the decoded pixels all images of one request may hold together
    (each image is also capped at 16 MP); more is a 413. ``max_concurrent_calls``: tool calls
    executing at once across all sessions; ``max_queued_calls``: calls admitted to wait for one
    (more get 429 with ``Retry-After``)."""
    executor = ToolExecutor(list(tool_names), options or {})
    sessions = _Sessions(executor, idle_ttl_s, max_sessions)
    slots = _CallSlots(max_concurrent_calls, max_queued_calls)
    replies = _Replies()
    registry = CollectorRegistry()
    calls = Counter("agentrl_tool_calls", "Tool calls by tool and status", ["tool", "status"], registry=registry)
    latency = Histogram("agentrl_tool_latency_seconds", "Tool call latency", ["tool"], registry=registry)
    live = Gauge("agentrl_tool_sessions", "Live per-trajectory sessions", registry=registry)
    live.set_function(lambda: len(sessions.sessions))
    running = Gauge("agentrl_tool_calls_running", "Tool calls executing now", registry=registry)
    running.set_function(lambda: slots.active)
    waiting = Gauge("agentrl_tool_calls_waiting", "Tool calls admitted and waiting to execute", registry=registry)
    waiting.set_function(lambda: slots.admitted - slots.active)
    busy = Counter("agentrl_tool_busy_rejections", "Batches refused with 429: the call queue was full",
                   registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def evictor():
            while True:
                await asyncio.sleep(max(0.05, idle_ttl_s / 4))
                await sessions.evict_idle()

        task = asyncio.create_task(evictor())
        yield
        task.cancel()
        await sessions.close()

    app = FastAPI(title="agentrl tool server", lifespan=lifespan)
    app.state.sessions = sessions
    app.state.slots = slots

    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)
    app.add_middleware(BearerAuth, token=token)  # outermost: no body is read before the token is checked

    @app.get("/health", response_model=HealthResponse)
    async def health() -> dict[str, Any]:
        return {"status": "ok", "tools": list(executor.tool_classes), "sessions": len(sessions.sessions)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/tools", response_model=ToolsResponse)
    async def tools() -> dict[str, Any]:
        return {"tools": executor.schemas}

    def open_batch_images(batch: BatchRequest) -> dict[int, list[Any]]:
        """The images of the requests that start a session, opened (headers only) and checked
        against the per-request pixel budget before any is decoded."""
        opened: dict[int, list[Any]] = {}
        total = 0
        for index, item in enumerate(batch.requests):
            if not item.images or (item.namespace, item.trajectory_id) in sessions.sessions:
                continue
            try:
                opened[index] = open_images(item.images)
            except Exception as error:  # undecodable images: the request is bad, not the server
                raise invalid(["body", "requests", index, "images"], "images must be base64 PNG, JPEG, WEBP, "
                              f"GIF or BMP of at most 16 MP: {error}") from None
            total += sum(image.width * image.height for image in opened[index])
            if total > max_request_pixels:
                raise HTTPException(413, f"the request's images hold more than {max_request_pixels:,} pixels; "
                                         "send fewer or smaller images per request")
        for images in opened.values():
            for image in images:
                image.load()
        return opened

    async def run_batch(batch: BatchRequest) -> dict[str, Any]:
        count = len(batch.requests)
        if count > slots.capacity:
            raise invalid(["body", "requests"], f"at most {slots.capacity} calls fit in the server's call queue")
        if not slots.admit(count):
            busy.inc()
            raise HTTPException(429, f"the tool server is running {slots.running} calls with up to {slots.queued} "
                                     "waiting; retry later", headers={"Retry-After": "1"})
        started = [False] * count  # a call that started releases its own admission when it ends
        try:
            return await admitted_batch(batch, started)
        finally:
            slots.release(started.count(False))

    async def admitted_batch(batch: BatchRequest, started: list[bool]) -> dict[str, Any]:
        try:
            images = await asyncio.to_thread(open_batch_images, batch)
        except OSError as error:
            raise invalid(["body", "requests"], f"an image cannot be decoded: {error}") from None

        async def one(index: int, item: CallRequest) -> dict[str, Any]:
            started[index] = True
            try:
                return await call_one(index, item)
            finally:
                slots.release()

        async def call_one(index: int, item: CallRequest) -> dict[str, Any]:
            label = item.tool if item.tool in executor.tool_classes else "unknown"
            key = (item.namespace, item.trajectory_id)
            session = sessions.get(key)
            if session is None and item.resume:
                calls.labels(label, "session_restarted").inc()
                return {"status": "session_restarted", "text": "", "images": [], "latency_s": 0.0,
                        "error": f"the tool server has no session for trajectory {item.trajectory_id!r} "
                                 "(it restarted or evicted the session); its tool state is lost"}
            if session is None:
                session = sessions.start(key, item.metadata, images.get(index, []))
            async with slots.running_slot():
                (result,) = await session.run([ToolCall(item.tool, item.arguments, index=index)])
            calls.labels(label, result.status).inc()
            latency.labels(label).observe(result.latency_s)
            encoded = await asyncio.to_thread(lambda: [encode_image(image) for image in result.observation.images])
            return {"status": result.status, "text": result.observation.text, "images": encoded,
                    "latency_s": result.latency_s, "error": result.error}

        new = {(item.namespace, item.trajectory_id) for item in batch.requests
               if (item.namespace, item.trajectory_id) not in sessions.sessions and not item.resume}
        if len(sessions.sessions) + len(new) > max_sessions:
            raise HTTPException(429, f"the tool server holds {len(sessions.sessions)} live sessions (at most "
                                     f"{max_sessions}); retry later", headers={"Retry-After": "1"})
        # every call runs to its end (and releases its slot) before the batch answers or fails
        results = await asyncio.gather(*(one(i, item) for i, item in enumerate(batch.requests)),
                                       return_exceptions=True)
        if any(isinstance(result, SessionsFull) for result in results):
            raise HTTPException(429, f"the tool server holds {max_sessions} live sessions; retry later",
                                headers={"Retry-After": "1"})
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return {"results": list(results)}

    @app.post("/call", response_model=BatchResponse, responses={
        413: {"description": "the body, or the pixels of the request's images, are over the limit"},
        429: {"description": "the call queue is full or the live-session cap is reached; retry after the "
                             "Retry-After seconds"}})
    async def call(batch: BatchRequest,
                   idempotency_key: str | None = Header(None, max_length=128)) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(batch.model_dump(), sort_keys=True, default=str).encode()).hexdigest()
        return await replies.run(idempotency_key, digest, lambda: run_batch(batch))

    @app.post("/release", response_model=ReleaseResponse)
    async def release(request: ReleaseRequest) -> dict[str, Any]:
        return {"released": await sessions.release((request.namespace, request.trajectory_id))}

    return app


def serve_tools(tool_names: list[str], host: str = "127.0.0.1", port: int = 8010, token: str | None = None,
                idle_ttl_s: float = 600.0, options: dict[str, dict[str, Any]] | None = None,
                insecure: bool = False, max_sessions: int = 4096, max_concurrent_calls: int = 64,
                max_queued_calls: int = 1024) -> None:
    import uvicorn

    check_bind(host, token, insecure, "tool server")
    app = create_app(tool_names, options, token=token, idle_ttl_s=idle_ttl_s, max_sessions=max_sessions,
                     max_concurrent_calls=max_concurrent_calls, max_queued_calls=max_queued_calls)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
