"""The retrieval server, speaking the Search-R1 protocol so existing clients work unchanged.

``POST /retrieve`` with ``{"queries": [...], "topk": k, "return_scores": true}`` answers
``{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}``; without scores the inner
items are the documents themselves. Concurrent requests are micro-batched: queries that arrive
within a few milliseconds of each other go to the index as one batched search in a worker thread,
so the event loop never blocks and throughput grows with load.

Bounded everywhere: request bodies (413, chunked or not), queries per request and characters per
query (422), and the queries waiting for the index (429 with ``Retry-After`` beyond
``max_pending_queries``). ``/health`` and ``/metrics`` are open; ``/retrieve`` needs the bearer
token when one is set. Binds 127.0.0.1 unless told otherwise, and refuses a non-loopback address
without a token.
"""


import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from pydantic import BaseModel, Field, field_validator

from agentrl.retrieval.index import Hit, Index
from agentrl.server import BearerAuth, BodyLimit, check_bind


class HealthResponse(BaseModel):
    status: str
    documents: int
    method: str


class RetrieveResponse(BaseModel):
    """Per query, the hits: documents, or ``{"document", "score"}`` with ``return_scores``."""

    result: list[list[dict[str, Any]]]


@dataclass
class _Pending:
    queries: list[str]
    topk: int
    future: asyncio.Future


class QueueFull(Exception):
    """More queries are waiting than the server admits; the client should retry later."""


class MicroBatcher:
    """Collects concurrent requests and answers them with one index call per batch. At most
    ``max_pending_queries`` queries wait (admitted, not yet answered); more raise :class:`QueueFull`."""

    def __init__(self, index: Index, max_batch_queries: int = 512, wait_s: float = 0.002,
                 max_pending_queries: int = 8192) -> None:
        self.index = index
        self.max_batch_queries = max_batch_queries
        self.wait_s = wait_s
        self.max_pending_queries = max_pending_queries
        self.pending = 0
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.batches = 0

    async def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        if self.pending + len(queries) > self.max_pending_queries:
            raise QueueFull()
        self.pending += len(queries)
        try:
            future = asyncio.get_running_loop().create_future()
            self.queue.put_nowait(_Pending(queries, topk, future))
            return await future
        finally:
            self.pending -= len(queries)

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(self.wait_s)
            size = len(batch[0].queries)
            while not self.queue.empty() and size < self.max_batch_queries:
                item = self.queue.get_nowait()
                batch.append(item)
                size += len(item.queries)
            depth = max(item.topk for item in batch)
            queries = [q for item in batch for q in item.queries]
            try:
                hits = await asyncio.to_thread(self.index.search, queries, depth)
            except Exception as error:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self.batches += 1
            position = 0
            for item in batch:
                rows = hits[position : position + len(item.queries)]
                position += len(item.queries)
                if not item.future.done():
                    item.future.set_result([row[: item.topk] for row in rows])


def create_app(index: Index, max_topk: int = 100, max_queries: int = 1024, batching: bool = True,
               wait_s: float = 0.002, token: str | None = None, max_query_chars: int = 4096,
               max_body_bytes: int = 2 * 1024 * 1024, max_pending_queries: int = 8192) -> FastAPI:
    class RetrieveRequest(BaseModel):
        queries: list[Annotated[str, Field(max_length=max_query_chars)]] = Field(min_length=1, max_length=max_queries)
        topk: int = Field(3, ge=1, le=max_topk)
        return_scores: bool = False

        @field_validator("queries")
        @classmethod
        def non_empty(cls, queries: list[str]) -> list[str]:
            if any(not q.strip() for q in queries):
                raise ValueError("queries must be non-empty strings")
            return queries

    batcher = MicroBatcher(index, wait_s=wait_s, max_pending_queries=max_pending_queries) if batching else None
    registry = CollectorRegistry()
    requests = Counter("agentrl_retriever_requests", "Retrieve requests by outcome", ["status"], registry=registry)
    pending = Gauge("agentrl_retriever_pending_queries", "Queries admitted and not yet answered", registry=registry)
    pending.set_function(lambda: batcher.pending if batcher else 0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run()) if batcher else None
        yield
        if task:
            task.cancel()

    app = FastAPI(title="agentrl retriever", lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)
    app.add_middleware(BearerAuth, token=token)  # outermost: the token is checked before any body is read

    @app.get("/health", response_model=HealthResponse)
    async def health() -> dict[str, Any]:
        return {"status": "ok", "documents": len(index), "method": index.method}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/retrieve", response_model=RetrieveResponse,
              responses={429: {"description": "too many queries waiting; retry after the Retry-After seconds"}})
    async def retrieve(request: RetrieveRequest) -> Response:
        if batcher is not None:
            try:
                hits = await batcher.search(request.queries, request.topk)
            except QueueFull:
                requests.labels("rejected").inc()
                return JSONResponse({"detail": f"more than {max_pending_queries} queries are waiting; retry later"},
                                    status_code=429, headers={"Retry-After": "1"})
        else:
            hits = await asyncio.to_thread(index.search, request.queries, request.topk)
        if request.return_scores:
            result = [[{"document": h.document, "score": h.score} for h in row] for row in hits]
        else:
            result = [[h.document for h in row] for row in hits]
        requests.labels("ok").inc()
        # Serialised directly: FastAPI's generic response encoding costs more than the search.
        return Response(json.dumps({"result": result}, ensure_ascii=False), media_type="application/json")

    return app


def serve_retriever(index_dir: str, host: str = "127.0.0.1", port: int = 8000, max_topk: int = 100,
                    batching: bool = True, workers: int = 1, token: str | None = None,
                    insecure: bool = False) -> None:
    """Serve ``index_dir``. With ``workers > 1`` uvicorn runs that many processes on one socket;
    each maps the same index files (the pages are shared) and micro-batches its own requests."""
    import uvicorn

    check_bind(host, token, insecure, "retriever")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    index = Index.load(index_dir)  # a bad index fails here, with the reason, not in every worker
    if workers == 1:
        uvicorn.run(create_app(index, max_topk=max_topk, batching=batching, token=token), host=host, port=port,
                    log_level="warning", access_log=False)
        return
    # The token reaches the worker processes through the environment, never their command line.
    os.environ[_ENV] = json.dumps({"index_dir": index_dir, "max_topk": max_topk, "batching": batching, "token": token})
    uvicorn.run(f"{__name__}:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level="warning", access_log=False)


_ENV = "AGENTRL_RETRIEVER"


def app_from_environment() -> FastAPI:
    """The app factory each uvicorn worker process calls (settings come through the environment)."""
    settings = json.loads(os.environ[_ENV])
    return create_app(Index.load(settings["index_dir"]), max_topk=settings["max_topk"], batching=settings["batching"],
                      token=settings.get("token"))
