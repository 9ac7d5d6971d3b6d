"""The code interpreter: Python in the sandbox, in-process or through a sandbox server.

Options: ``backend`` (``bwrap`` by default, ``docker``, or ``process`` for trusted code), ``session``
(keep variables between calls of one trajectory, like a notebook; default false: every call runs in
a fresh interpreter), ``timeout_s`` (10), ``memory_mb`` (512), ``server_url`` (a sandbox server
speaking the SandboxFusion ``/run_code`` API; stateless), ``token`` (its bearer token). The sandbox backend is shared by all
trajectories of the process; a session belongs to one trajectory and ends with it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agentrl.sandbox.base import Backend, RunResult, SandboxUnavailable, get_backend

from agentrl.tool import InfraError, Tool, ToolContext

_backends: dict[str, Backend] = {}
_backends_lock = threading.Lock()
# Calls that wait for a free sandbox wait here, not in asyncio's default executor, where they would
# starve every other tool's threads (SQL, images, local search).
_executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="agentrl-python-tool")


async def in_sandbox_thread(function, *args):
    return await asyncio.get_running_loop().run_in_executor(_executor, functools.partial(function, *args))


def shared_backend(name: str, **options: Any) -> Backend:
    """One backend (one warm pool) per configuration, per process."""
    key = f"{name}:{sorted(options.items())}"
    with _backends_lock:
        if key not in _backends:
            _backends[key] = get_backend(name, **options)
        return _backends[key]


class PythonTool(Tool):
    """Run Python code and see what it prints (stdout) and, if it fails, the error."""

    option_names = ("server_url", "backend", "backend_options", "timeout_s", "memory_mb", "session", "token")

    name = "python"
    timeout = 60.0

    async def setup(self, context: ToolContext) -> None:
        await super().setup(context)
        self.session = None
        self.server_url = self.options.get("server_url")
        if self.server_url:
            return
        try:
            backend_options = dict(self.options.get("backend_options", {}))
            self.backend = await asyncio.to_thread(shared_backend, self.options.get("backend", "bwrap"), **backend_options)
        except SandboxUnavailable as error:
            raise InfraError(str(error)) from None

    async def call(self, code: str) -> str:
        """
        Args:
            code: Python source; print what you want to see.
        """
        timeout = float(self.options.get("timeout_s", 10.0))
        memory_mb = int(self.options.get("memory_mb", 512))
        try:
            if self.server_url:
                result = await self._remote(code, timeout, memory_mb)
            elif self.options.get("session", False):
                if self.session is None:
                    self.session = self.backend.session(memory_mb)
                result = await in_sandbox_thread(self.session.run, code, timeout)
            else:
                result = await in_sandbox_thread(self.backend.run, code, "", None, timeout, memory_mb)
        except SandboxUnavailable as error:  # no worker could start or became free: not the model's fault
            raise InfraError(str(error)) from None
        if result.sandbox_error:
            raise InfraError(result.sandbox_error)
        return result.for_model()

    async def _remote(self, code: str, timeout: float, memory_mb: int) -> RunResult:
        import httpx
        from tenacity import (
            AsyncRetrying,
            RetryError,
            retry_if_exception,
            stop_after_attempt,
            wait_random_exponential,
        )

        def transient(error: BaseException) -> bool:
            """Unreachable, busy (429) or restarting: worth another try. A 4xx is not."""
            if isinstance(error, httpx.HTTPStatusError):
                return error.response.status_code in (429, 502, 503, 504)
            return isinstance(error, httpx.TransportError)

        payload = {"code": code, "language": "python", "run_timeout": timeout, "memory_limit_MB": memory_mb}
        token = self.options.get("token")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async for attempt in AsyncRetrying(retry=retry_if_exception(transient), stop=stop_after_attempt(5),
                                               wait=wait_random_exponential(multiplier=0.1, max=2.0), reraise=False):
                with attempt:
                    async with httpx.AsyncClient(timeout=timeout + 30) as client:
                        response = await client.post(f"{self.server_url.rstrip('/')}/run_code", json=payload,
                                                     headers=headers)
                    response.raise_for_status()
        except RetryError as error:
            raise InfraError(f"sandbox server {self.server_url} failed after retries: {error.last_attempt.exception()}") from None
        except httpx.HTTPStatusError as error:
            raise InfraError(f"sandbox server {self.server_url} refused the request: {error}") from None
        body = response.json()
        run = body.get("run_result") or {}
        if body.get("status") == "SandboxError":
            return RunResult(sandbox_error=body.get("message") or "sandbox error")
        return RunResult(stdout=run.get("stdout") or "", stderr=run.get("stderr") or "", return_code=run.get("return_code"),
                         timed_out=run.get("status") == "TimeLimitExceeded", duration_s=run.get("execution_time") or 0.0)

    async def close(self) -> None:
        if self.session is not None:
            await in_sandbox_thread(self.session.close)
            self.session = None
