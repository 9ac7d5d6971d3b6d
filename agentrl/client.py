"""Client of the tool server: pooled async HTTP with retries, so a restarting server loses no call.

Transient failures (connection refused or reset, 5xx, 429) are retried with jittered exponential
backoff, never sooner than a ``Retry-After`` the server sent (a busy server's call queue is full);
when the retries run out the call raises :class:`~agentrl.tool.InfraError` and the
trajectory is marked ``infra_error`` instead of being scored as a model failure. Every attempt of
one call carries the same ``Idempotency-Key``, and the server answers a repeated key with the first
attempt's result, so a call whose answer was lost (a read timeout) never runs twice. A trajectory
whose sticky session the server no longer has (it restarted, or evicted it) is an infrastructure
failure too: its tool state is gone, and the model must not be blamed for what follows.

Sessions are named by ``(namespace, trajectory_id)``; each client draws a random secret namespace,
so clients of two runs sharing a server never address each other's sessions, even when their
trajectory ids are the same.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import uuid
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from agentrl.tool import InfraError, Observation, ToolError


class _Transient(Exception):
    """An HTTP answer worth retrying (5xx, 429), with the server's ``Retry-After`` in seconds."""

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _retry_after_s(value: str | None, cap_s: float = 10.0) -> float:
    """A ``Retry-After`` given in seconds, capped; an HTTP date or garbage counts as none."""
    try:
        return min(max(float(value), 0.0), cap_s) if value else 0.0
    except ValueError:
        return 0.0


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, (httpx.TransportError, _Transient))


def encode_image(image: Any) -> str:
    """A PIL image as base64 PNG, the way images cross the tool server's JSON API."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def open_images(encoded: list[str], max_pixels: int = 16_000_000) -> list[Any]:
    """Open base64 images without decoding any pixel: the format must be one of the image tool's
    (``IMAGE_FORMATS``) and the size, read from the header, at most ``max_pixels``."""
    from PIL import Image

    from agentrl.tools.image import IMAGE_FORMATS

    images = []
    for item in encoded:
        image = Image.open(io.BytesIO(base64.b64decode(item, validate=True)), formats=IMAGE_FORMATS)
        if image.width * image.height > max_pixels:
            raise ValueError(f"an image is {image.width}x{image.height}, over the {max_pixels:,}-pixel limit")
        images.append(image)
    return images


def decode_images(encoded: list[str], max_pixels: int = 16_000_000) -> list[Any]:
    """Decode base64 images eagerly, so a malformed one fails here and not inside a tool. The size
    is read from the header and checked before any pixel is decoded (decompression bombs)."""
    images = open_images(encoded, max_pixels)
    for image in images:
        image.load()
    return images


class ToolServerClient:
    """``read_timeout_s``: how long one attempt waits for an answer (default: the tool's timeout
    plus 10 s). ``namespace``: the secret that names this client's sessions on the server (default:
    128 random bits; clients that must share sessions pass the same one)."""

    def __init__(self, url: str, token: str | None = None, attempts: int | None = None, max_wait_s: float = 30.0,
                 max_connections: int = 256, read_timeout_s: float | None = None,
                 namespace: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.namespace = namespace or secrets.token_hex(16)
        self.token = token
        self.attempts = attempts
        self.max_wait_s = max_wait_s
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self._clients: dict[int, httpx.AsyncClient] = {}
        self._started: set[str] = set()  # trajectories whose session the server has acknowledged

    def _client(self) -> httpx.AsyncClient:
        key = id(asyncio.get_running_loop())
        if key not in self._clients:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
            self._clients[key] = httpx.AsyncClient(base_url=self.url, headers=headers, limits=limits, timeout=None)
        return self._clients[key]

    async def _post(self, path: str, payload: dict[str, Any], timeout: float,
                    idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None

        async def once() -> dict[str, Any]:
            response = await self._client().post(path, json=payload, timeout=timeout, headers=headers)
            if response.status_code >= 500 or response.status_code == 429:
                raise _Transient(f"{response.status_code} from {self.url}{path}",
                                 _retry_after_s(response.headers.get("Retry-After")))
            if response.status_code >= 400:
                raise InfraError(f"tool server refused the request ({response.status_code}): {response.text[:300]}")
            return response.json()

        backoff = wait_random_exponential(multiplier=0.1, max=2.0)

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome is not None else None
            return max(backoff(state), getattr(error, "retry_after_s", 0.0))

        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_is_transient),
                wait=wait,
                # A restarting server is waited for up to max_wait_s, however many attempts that takes.
                stop=stop_after_delay(self.max_wait_s) | stop_after_attempt(self.attempts or 10**9),
                reraise=False,
            ):
                with attempt:
                    return await once()
        except RetryError as error:
            cause = error.last_attempt.exception()
            raise InfraError(f"tool server {self.url} unreachable after retries: {cause}") from cause
        raise InfraError(f"tool server {self.url}: no attempt was made")

    async def call(self, trajectory_id: str, tool: str, arguments: dict[str, Any], timeout: float,
                   metadata: dict[str, Any] | None = None, images: list[str] | None = None) -> Observation:
        """One call. ``metadata`` (JSON-safe) and ``images`` (base64 PNG) travel with every call, so
        a server that evicted the trajectory or restarted rebuilds the same tool context."""
        request = {"trajectory_id": trajectory_id, "namespace": self.namespace, "tool": tool,
                   "arguments": arguments, "resume": trajectory_id in self._started}
        if metadata:
            request["metadata"] = metadata
        if images:
            request["images"] = images
        payload = {"requests": [request]}
        read_timeout = self.read_timeout_s if self.read_timeout_s is not None else timeout + 10.0
        result = (await self._post("/call", payload, read_timeout, uuid.uuid4().hex))["results"][0]
        status, error = result["status"], result.get("error")
        if status == "session_restarted":
            self._started.discard(trajectory_id)
            raise InfraError(error or "the tool server lost this trajectory's session")
        self._started.add(trajectory_id)
        if status == "infra_error":
            raise InfraError(error or "tool infrastructure failed on the server")
        if status == "timeout":
            raise asyncio.TimeoutError(error)
        if status != "ok":
            raise ToolError(error or result.get("text", "the tool failed"))
        return Observation(result.get("text", ""), decode_images(result.get("images", [])))

    async def release(self, trajectory_id: str) -> None:
        self._started.discard(trajectory_id)
        await self._post("/release", {"trajectory_id": trajectory_id, "namespace": self.namespace}, 10.0)

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()
