"""The sandbox server, speaking SandboxFusion's ``POST /run_code`` so that existing SandboxFusion
clients (verl's, SPEAR's) work against it unchanged.

Request: ``code``, ``language`` (``python``, ``bash``, and ``nodejs``, ``perl`` where the host has
them; anything else is refused naming the supported ones), ``run_timeout``, ``memory_limit_MB``
(capped: above the cap the answer is 422), ``stdin``, ``files`` (name -> base64), ``fetch_files``
(work-directory files to return, 16 MiB in all). Response: ``status`` (``Success`` / ``Failed`` /
``SandboxError``), ``message`` (names each requested file not returned, and why),
``compile_result`` (null), ``run_result`` {``status`` (``Finished`` / ``TimeLimitExceeded`` /
``Error``), ``execution_time``, ``return_code``, ``stdout``, ``stderr``}, ``files`` (name ->
base64). The memory limits of the executions admitted at once never exceed the memory budget. As in SandboxFusion, a program that ran to its end is ``Finished`` whatever its exit
code (the top-level status is then ``Failed`` when that code is not 0); ``Error`` means it could not
be run. At most ``workers`` executions run at once and ``queue`` more wait; beyond that the
answer is HTTP 429, so a burst never grows memory without bound. ``/health`` and ``/metrics`` are
open; ``/run_code`` needs the bearer token when one is set. Binds 127.0.0.1 unless told otherwise.
"""

import asyncio
import base64
import binascii
import contextlib
import os
import time
from typing import Any, Literal

from agentrl.sandbox.base import Backend
from fastapi import FastAPI
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

from agentrl.server import BearerAuth, BodyLimit, check_bind

DEFAULT_MEMORY_MB = 1024


class RunCodeRequest(BaseModel):
    code: str = Field(max_length=1_000_000)
    language: str = "python"
    compile_timeout: float = 10.0
    run_timeout: float = Field(10.0, gt=0, le=300)
    memory_limit_MB: int = Field(-1, ge=-1, le=1 << 30)  # -1 (SandboxFusion's default): the server's default
    stdin: str | None = None
    files: dict[str, str | None] = {}
    fetch_files: list[str] = []


class RunResult(BaseModel):
    status: Literal["Finished", "TimeLimitExceeded", "Error"]
    execution_time: float | None
    return_code: int | None
    stdout: str
    stderr: str


class RunCodeResponse(BaseModel):
    """SandboxFusion's answer, as documented in the API schema (the handler returns plain dicts)."""

    status: Literal["Success", "Failed", "SandboxError"]
    message: str
    compile_result: None = None
    run_result: RunResult | None
    files: dict[str, str]


class SandboxErrorResponse(BaseModel):
    status: Literal["SandboxError"]
    message: str


# What /run_code answers besides 200, so that clients (and the schema-driven tests) know each shape.
RUN_CODE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": RunCodeResponse},
    422: {"description": "a malformed request, or a memory_limit_MB over the server's cap",
          "content": {"application/json": {"schema": {"anyOf": [
              {"$ref": "#/components/schemas/HTTPValidationError"},
              {"$ref": "#/components/schemas/SandboxErrorResponse"}]}}}},
    429: {"model": SandboxErrorResponse, "description": "the queue or the memory budget is full; retry later"},
}


def run_code_response(result, error: str | None = None) -> dict[str, Any]:
    """SandboxFusion's response; ``files`` holds the fetched files (base64), and ``message`` names
    each requested file that was not returned, with the reason."""
    if error is not None:
        return {"status": "SandboxError", "message": error, "compile_result": None, "run_result": None, "files": {}}
    if result.timed_out:
        run_status = "TimeLimitExceeded"
    elif result.return_code is None:
        run_status = "Error"
    else:
        run_status = "Finished"
    return {
        "status": "Success" if run_status == "Finished" and result.return_code == 0 else "Failed",
        "message": "; ".join(f"{name}: {reason}" for name, reason in result.files_missing.items()),
        "compile_result": None,
        "run_result": {
            "status": run_status,
            "execution_time": result.duration_s,
            "return_code": result.return_code,
            "stdout": result.stdout,
            "stderr": result.stderr,
        },
        "files": result.files,
    }


def host_memory_mb() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20


def create_app(backend: Backend, workers: int = 2, queue: int = 32, token: str | None = None,
               max_body_bytes: int = 16 * 1024 * 1024, memory_budget_mb: int | None = None,
               max_memory_mb: int = 4096) -> FastAPI:
    """``memory_budget_mb`` (half the host's memory by default) bounds the sum of the memory limits
    of the executions admitted at once (running or queued); a request that does not fit gets 429.
    ``max_memory_mb`` caps one request's ``memory_limit_MB``; above it the answer is 422."""
    slots = asyncio.Semaphore(workers)
    admitted = {"count": 0, "memory_mb": 0}
    budget_mb = memory_budget_mb if memory_budget_mb is not None else host_memory_mb() // 2
    cap_mb = min(max_memory_mb, budget_mb)
    registry = CollectorRegistry()
    runs = Counter("agentrl_sandbox_runs", "Executions by outcome", ["status"], registry=registry)
    rejected = Counter("agentrl_sandbox_rejected", "Requests refused with 429", registry=registry)
    latency = Histogram("agentrl_sandbox_seconds", "Execution time", registry=registry)
    in_flight = Gauge("agentrl_sandbox_in_flight", "Admitted executions (running or queued)", registry=registry)
    in_flight.set_function(lambda: admitted["count"])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(backend.close)

    app = FastAPI(title="agentrl sandbox", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)
    app.add_middleware(BearerAuth, token=token)  # outermost: the token is checked before any body is read

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backend": backend.name, "in_flight": admitted["count"]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/run_code", responses=RUN_CODE_RESPONSES)
    async def run_code(request: RunCodeRequest):
        language = "python" if request.language == "python3" else request.language
        if language not in backend.languages():
            return run_code_response(None, f"language {request.language!r} is not supported here; supported: "
                                           f"{', '.join(backend.languages())}")
        memory_mb = request.memory_limit_MB if request.memory_limit_MB > 0 else min(DEFAULT_MEMORY_MB, cap_mb)
        if memory_mb > cap_mb:
            return JSONResponse({"status": "SandboxError", "message": f"memory_limit_MB {memory_mb} is over this server's "
                                 f"cap of {cap_mb} MB; ask for at most {cap_mb}"}, status_code=422)
        if admitted["count"] >= workers + queue:
            rejected.inc()
            return JSONResponse({"status": "SandboxError", "message": "the sandbox queue is full; retry later"},
                                status_code=429, headers={"Retry-After": "1"})
        if admitted["memory_mb"] + memory_mb > budget_mb:
            rejected.inc()
            return JSONResponse({"status": "SandboxError", "message": f"the sandbox's memory budget of {budget_mb} MB "
                                 "is granted to executions in progress; retry later"},
                                status_code=429, headers={"Retry-After": "1"})
        try:
            files = {name: base64.b64decode(data, validate=True) for name, data in request.files.items() if data is not None}
        except (binascii.Error, ValueError):
            return run_code_response(None, "files must be base64-encoded")
        admitted["count"] += 1
        admitted["memory_mb"] += memory_mb
        try:
            async with slots:
                started = time.perf_counter()
                result = await asyncio.to_thread(backend.run, request.code, request.stdin or "", files,
                                                 request.run_timeout, memory_mb, language, request.fetch_files)
                latency.observe(time.perf_counter() - started)
        except Exception as error:  # the backend failed, not the code
            runs.labels("SandboxError").inc()
            return run_code_response(None, f"{type(error).__name__}: {error}")
        finally:
            admitted["count"] -= 1
            admitted["memory_mb"] -= memory_mb
        if result.sandbox_error:
            runs.labels("SandboxError").inc()
            return run_code_response(None, result.sandbox_error)
        response = run_code_response(result)
        runs.labels(response["run_result"]["status"]).inc()
        return response

    return app


def serve_sandbox(backend_name: str = "bwrap", host: str = "127.0.0.1", port: int = 8080, workers: int = 2,
                  queue: int = 32, token: str | None = None, insecure: bool = False) -> None:
    import uvicorn
    from agentrl.sandbox.base import get_backend

    check_bind(host, token, insecure, "sandbox server")  # before any sandbox starts

    options = {} if backend_name == "docker" else {"pool_size": workers}
    backend = get_backend(backend_name, **options)
    uvicorn.run(create_app(backend, workers, queue, token=token), host=host, port=port, log_level="warning", access_log=False)
