"""The tool server: tool calls over HTTP, keyed by trajectory, for rollouts that run elsewhere.

``POST /call`` takes a batch ``{"requests": [{"trajectory_id", "tool", "arguments"}, ...]}`` and
answers ``{"results": [{"status", "text", "images", "latency_s", "error"}, ...]}`` in request order.
Tool instances are sticky per trajectory (a Python session survives between turns), evicted after
an idle TTL or on ``POST /release``. ``/health`` and ``/metrics`` (Prometheus text) are open; every
other route needs the bearer token when one is set. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
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

from agentrl.client import decode_images, encode_image
from agentrl.executor import ToolExecutor, ToolSession
from agentrl.parsing import ToolCall
from agentrl.tool import ToolContext


class CallRequest(BaseModel):
    trajectory_id: str = Field(min_length=1, max_length=256)
    tool: str
    arguments: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    images: list[str] = []  # base64 PNG: the task's images, used when the trajectory's session starts


class BatchRequest(BaseModel):
    requests: list[CallRequest] = Field(min_length=1, max_length=4096)


class ReleaseRequest(BaseModel):
    trajectory_id: str


class BodyLimit:
    """Refuse request bodies over a size limit with 413, whether or not they declare a length.

    A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which costs a task per request)."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_body_bytes:
            return await self._refuse(send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        response = JSONResponse({"detail": f"request body over {self.max_body_bytes} bytes"}, status_code=413)
        await response({"type": "http"}, None, send)


class _TooLarge(Exception):
    pass


class _Sessions:
    """Sticky per-trajectory tool sessions with idle-TTL eviction."""

    def __init__(self, executor: ToolExecutor, idle_ttl_s: float) -> None:
        self.executor = executor
        self.idle_ttl_s = idle_ttl_s
        self.sessions: dict[str, tuple[ToolSession, float]] = {}

    def get(self, trajectory_id: str, metadata: dict[str, Any], images: list[str]) -> ToolSession:
        entry = self.sessions.get(trajectory_id)
        if entry:
            session = entry[0]
        else:
            context = ToolContext(trajectory_id, metadata, decode_images(images))
            session = self.executor.session(trajectory_id, context)
        self.sessions[trajectory_id] = (session, time.monotonic())
        return session

    async def release(self, trajectory_id: str) -> bool:
        entry = self.sessions.pop(trajectory_id, None)
        if entry:
            await entry[0].close()
        return entry is not None

    async def evict_idle(self) -> int:
        now = time.monotonic()
        idle = [tid for tid, (_, used) in self.sessions.items() if now - used > self.idle_ttl_s]
        for trajectory_id in idle:
            await self.release(trajectory_id)
        return len(idle)

    async def close(self) -> None:
        for trajectory_id in list(self.sessions):
            await self.release(trajectory_id)


def create_app(
    tool_names: list[str],
    options: dict[str, dict[str, Any]] | None = None,
    token: str | None = None,
    idle_ttl_s: float = 600.0,
    max_body_bytes: int = 4 * 1024 * 1024,
) -> FastAPI:
    executor = ToolExecutor(list(tool_names), options or {})
    sessions = _Sessions(executor, idle_ttl_s)
    registry = CollectorRegistry()
    calls = Counter("agentrl_tool_calls", "Tool calls by tool and status", ["tool", "status"], registry=registry)
    latency = Histogram("agentrl_tool_latency_seconds", "Tool call latency", ["tool"], registry=registry)
    live = Gauge("agentrl_tool_sessions", "Live per-trajectory sessions", registry=registry)
    live.set_function(lambda: len(sessions.sessions))

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

    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)

    def authorise(request: Request) -> None:
        if token is None:
            return
        supplied = request.headers.get("authorization", "")
        if not secrets.compare_digest(supplied, f"Bearer {token}"):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "tools": list(executor.tool_classes), "sessions": len(sessions.sessions)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/tools", dependencies=[Depends(authorise)])
    async def tools() -> dict[str, Any]:
        return {"tools": executor.schemas}

    @app.post("/call", dependencies=[Depends(authorise)])
    async def call(batch: BatchRequest) -> dict[str, Any]:
        async def one(index: int, item: CallRequest) -> dict[str, Any]:
            try:
                session = sessions.get(item.trajectory_id, item.metadata, item.images)
            except Exception as error:  # undecodable images: the request is bad, not the server
                raise HTTPException(422, f"request {index}: images are not base64 PNG/JPEG: {error}") from None
            (result,) = await session.run([ToolCall(item.tool, item.arguments, index=index)])
            calls.labels(item.tool, result.status).inc()
            latency.labels(item.tool).observe(result.latency_s)
            return {
                "status": result.status,
                "text": result.observation.text,
                "images": [encode_image(image) for image in result.observation.images],
                "latency_s": result.latency_s,
                "error": result.error,
            }

        results = await asyncio.gather(*(one(i, item) for i, item in enumerate(batch.requests)))
        return {"results": list(results)}

    @app.post("/release", dependencies=[Depends(authorise)])
    async def release(request: ReleaseRequest) -> dict[str, Any]:
        return {"released": await sessions.release(request.trajectory_id)}

    return app


def serve_tools(tool_names: list[str], host: str = "127.0.0.1", port: int = 8010, token: str | None = None,
                idle_ttl_s: float = 600.0, options: dict[str, dict[str, Any]] | None = None) -> None:
    import uvicorn

    app = create_app(tool_names, options, token=token, idle_ttl_s=idle_ttl_s)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
