"""Client of the tool server: pooled async HTTP with retries, so a restarted server loses no call.

Transient failures (connection refused or reset, 5xx, 429) are retried with jittered exponential
backoff; when the retries run out the call raises :class:`~agentrl.tool.InfraError` and the
trajectory is marked ``infra_error`` instead of being scored as a model failure.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from agentrl.tool import InfraError, Observation, ToolError


class _Transient(Exception):
    """An HTTP answer worth retrying (5xx, 429)."""


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, (httpx.TransportError, _Transient))


def decode_images(encoded: list[str]) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(item))) for item in encoded]


class ToolServerClient:
    def __init__(self, url: str, token: str | None = None, attempts: int | None = None, max_wait_s: float = 30.0,
                 max_connections: int = 256) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.attempts = attempts
        self.max_wait_s = max_wait_s
        self.max_connections = max_connections
        self._clients: dict[int, httpx.AsyncClient] = {}

    def _client(self) -> httpx.AsyncClient:
        key = id(asyncio.get_running_loop())
        if key not in self._clients:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
            self._clients[key] = httpx.AsyncClient(base_url=self.url, headers=headers, limits=limits, timeout=None)
        return self._clients[key]

    async def _post(self, path: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            response = await self._client().post(path, json=payload, timeout=timeout)
            if response.status_code >= 500 or response.status_code == 429:
                raise _Transient(f"{response.status_code} from {self.url}{path}")
            if response.status_code >= 400:
                raise InfraError(f"tool server refused the request ({response.status_code}): {response.text[:300]}")
            return response.json()

        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_is_transient),
                wait=wait_random_exponential(multiplier=0.1, max=2.0),
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

    async def call(self, trajectory_id: str, tool: str, arguments: dict[str, Any], timeout: float) -> Observation:
        payload = {"requests": [{"trajectory_id": trajectory_id, "tool": tool, "arguments": arguments}]}
        result = (await self._post("/call", payload, timeout + 10.0))["results"][0]
        status, error = result["status"], result.get("error")
        if status == "infra_error":
            raise InfraError(error or "tool infrastructure failed on the server")
        if status == "timeout":
            raise asyncio.TimeoutError(error)
        if status != "ok":
            raise ToolError(error or result.get("text", "the tool failed"))
        return Observation(result.get("text", ""), decode_images(result.get("images", [])))

    async def release(self, trajectory_id: str) -> None:
        await self._post("/release", {"trajectory_id": trajectory_id}, 10.0)

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()
