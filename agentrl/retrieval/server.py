"""The retrieval server, speaking the Search-R1 protocol so existing clients work unchanged.

``POST /retrieve`` with ``{"queries": [...], "topk": k, "return_scores": true}`` answers
``{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}``; without scores the inner
items are the documents themselves. Concurrent requests are micro-batched: queries that arrive
within a few milliseconds of each other go to the index as one batched search in a worker thread,
so the event loop never blocks and throughput grows with load.
"""


import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Response
from pydantic import BaseModel, Field, field_validator

from agentrl.retrieval.index import Hit, Index


@dataclass
class _Pending:
    queries: list[str]
    topk: int
    future: asyncio.Future


class MicroBatcher:
    """Collects concurrent requests and answers them with one index call per batch."""

    def __init__(self, index: Index, max_batch_queries: int = 512, wait_s: float = 0.002) -> None:
        self.index = index
        self.max_batch_queries = max_batch_queries
        self.wait_s = wait_s
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.batches = 0

    async def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(queries, topk, future))
        return await future

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
               wait_s: float = 0.002) -> FastAPI:
    class RetrieveRequest(BaseModel):
        queries: list[str] = Field(min_length=1, max_length=max_queries)
        topk: int = Field(3, ge=1, le=max_topk)
        return_scores: bool = False

        @field_validator("queries")
        @classmethod
        def non_empty(cls, queries: list[str]) -> list[str]:
            if any(not q.strip() for q in queries):
                raise ValueError("queries must be non-empty strings")
            return queries

    batcher = MicroBatcher(index, wait_s=wait_s) if batching else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run()) if batcher else None
        yield
        if task:
            task.cancel()

    app = FastAPI(title="agentrl retriever", lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "documents": len(index), "method": index.method}

    @app.post("/retrieve")
    async def retrieve(request: RetrieveRequest) -> Response:
        if batcher is not None:
            hits = await batcher.search(request.queries, request.topk)
        else:
            hits = await asyncio.to_thread(index.search, request.queries, request.topk)
        if request.return_scores:
            result = [[{"document": h.document, "score": h.score} for h in row] for row in hits]
        else:
            result = [[h.document for h in row] for row in hits]
        # Serialised directly: FastAPI's generic response encoding costs more than the search.
        return Response(json.dumps({"result": result}, ensure_ascii=False), media_type="application/json")

    return app


def serve_retriever(index_dir: str, host: str = "127.0.0.1", port: int = 8000, max_topk: int = 100,
                    batching: bool = True, workers: int = 1) -> None:
    """Serve ``index_dir``. With ``workers > 1`` uvicorn runs that many processes on one socket;
    each maps the same index files (the pages are shared) and micro-batches its own requests."""
    import uvicorn

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    index = Index.load(index_dir)  # a bad index fails here, with the reason, not in every worker
    if workers == 1:
        uvicorn.run(create_app(index, max_topk=max_topk, batching=batching), host=host, port=port,
                    log_level="warning", access_log=False)
        return
    os.environ[_ENV] = json.dumps({"index_dir": index_dir, "max_topk": max_topk, "batching": batching})
    uvicorn.run(f"{__name__}:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level="warning", access_log=False)


_ENV = "AGENTRL_RETRIEVER"


def app_from_environment() -> FastAPI:
    """The app factory each uvicorn worker process calls (settings come through the environment)."""
    settings = json.loads(os.environ[_ENV])
    return create_app(Index.load(settings["index_dir"]), max_topk=settings["max_topk"], batching=settings["batching"])
