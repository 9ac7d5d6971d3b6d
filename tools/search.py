"""The search tool: passages from an in-process index or a remote retrieval server.

Options: ``index`` (an index directory; default: the bundled fictional demo corpus, indexed in
memory on first use), or ``server_url`` (a retriever speaking the Search-R1 protocol, reached with
pooled httpx and jittered retries; when they run out the call is an infrastructure error),
``topk`` (3) and ``max_doc_chars`` (per-document limit, 600). Results are cached (LRU) per backend.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from agentrl.retrieval.index import Index, read_corpus, title_and_text
from agentrl.tool import InfraError, Tool, ToolError

_indexes: dict[str, Index] = {}
_indexes_lock = threading.Lock()


def shared_index(path: str | None) -> Index:
    """One in-process index per path, shared by every tool instance of the process."""
    key = path or "<demo>"
    with _indexes_lock:
        if key not in _indexes:
            if path is None:
                _indexes[key] = Index.from_documents(list(read_corpus(demo_corpus_path())))
            else:
                _indexes[key] = Index.load(path)
        return _indexes[key]


def demo_corpus_path() -> Path:
    from agentrl import envs

    return Path(envs.__file__).parent / "data" / "fictional" / "corpus.jsonl"


def format_results(documents: list[dict[str, Any]], max_doc_chars: int) -> str:
    """Numbered documents with their titles, as Search-R1 shows them to the model."""
    if not documents:
        return "No results."
    lines = []
    for number, document in enumerate(documents, start=1):
        title, text = title_and_text(document["contents"])
        if len(text) > max_doc_chars:
            text = text[:max_doc_chars].rsplit(" ", 1)[0] + " …"
        lines.append(f"Doc {number}(Title: {title}) {text}")
    return "\n".join(lines)


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


_caches: dict[str, _LRU] = {}
_clients: dict[int, Any] = {}


def _http_client():
    """One pooled httpx client per event loop."""
    import httpx

    key = id(asyncio.get_running_loop())
    if key not in _clients:
        _clients[key] = httpx.AsyncClient(limits=httpx.Limits(max_connections=256))
    return _clients[key]


class SearchTool(Tool):
    """Search the knowledge corpus and read the most relevant passages."""

    option_names = ("topk", "max_doc_chars", "server_url", "index", "cache_size", "attempts", "token")

    name = "search"
    timeout = 30.0

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.topk = int(options.get("topk", 3))
        self.max_doc_chars = int(options.get("max_doc_chars", 600))
        self.server_url = options.get("server_url")
        backend = self.server_url or options.get("index") or "<demo>"
        self.cache = _caches.setdefault(backend, _LRU(int(options.get("cache_size", 10_000))))

    async def call(self, query: str) -> str:
        """
        Args:
            query: what to look for, e.g. a name or a question.
        """
        query = " ".join(query.split())
        if not query:
            raise ToolError("the search query is empty")
        key = (query, self.topk)
        documents = self.cache.get(key)
        if documents is None:
            documents = await (self._remote(query) if self.server_url else self._local(query))
            self.cache.put(key, documents)
        return format_results(documents, self.max_doc_chars)

    async def _local(self, query: str) -> list[dict[str, Any]]:
        index = await asyncio.to_thread(shared_index, self.options.get("index"))
        hits = await asyncio.to_thread(index.search, [query], self.topk)
        return [hit.document for hit in hits[0]]

    async def _remote(self, query: str) -> list[dict[str, Any]]:
        import httpx
        from tenacity import (
            AsyncRetrying,
            RetryError,
            retry_if_exception_type,
            stop_after_attempt,
            wait_random_exponential,
        )

        payload = {"queries": [query], "topk": self.topk, "return_scores": False}
        # The retriever's bearer token: the option, else the environment (as compose passes it).
        token = self.options.get("token") or os.environ.get("AGENTRL_SERVER_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((httpx.TransportError, httpx.HTTPStatusError)),
                wait=wait_random_exponential(multiplier=0.1, max=2.0),
                stop=stop_after_attempt(int(self.options.get("attempts", 5))),
            ):
                with attempt:
                    response = await _http_client().post(
                        f"{self.server_url.rstrip('/')}/retrieve", json=payload, timeout=self.timeout, headers=headers
                    )
                    if response.status_code == 422:
                        raise ToolError(f"the retriever rejected the query: {response.json().get('detail')}")
                    response.raise_for_status()
                    return response.json()["result"][0]
        except RetryError as error:
            raise InfraError(f"retriever {self.server_url} failed after retries: {error.last_attempt.exception()}") from None
        raise InfraError(f"retriever {self.server_url}: no attempt was made")
