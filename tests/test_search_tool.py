"""The search tool: numbered, titled, length-limited results, in-process or from a retriever server."""

import asyncio

from agentrl.tools.search import SearchTool, format_results

from agentrl.executor import ToolExecutor
from agentrl.parsing import ToolCall
from agentrl.retrieval.index import Index, read_corpus
from agentrl.retrieval.server import create_app
from tests.helpers.servers import free_port, serve_app


def search(query, options=None):
    async def main():
        executor = ToolExecutor(["search"], {"search": options or {}})
        async with executor.session("t") as session:
            return (await session.run([ToolCall("search", {"query": query})]))[0]

    return asyncio.run(main())


def test_results_are_numbered_with_titles():
    result = search("Laskam Glimbys", {"topk": 2})
    lines = result.observation.text.splitlines()
    assert result.status == "ok" and len(lines) == 2
    assert lines[0].startswith("Doc 1(Title: Laskam Glimbys) Laskam Glimbys was a beekeeper")
    assert lines[1].startswith("Doc 2(Title: ")


def test_documents_are_cut_to_the_length_limit():
    text = format_results([{"id": "1", "contents": "T\n" + "word " * 100}], max_doc_chars=30)
    assert text.startswith("Doc 1(Title: T) word") and text.endswith("…") and len(text) < 60


def test_results_are_cached():
    tool = SearchTool(topk=1, cache_size=4)
    first = asyncio.run(tool.call("Drournix"))
    assert tool.cache.get(("Drournix", 1)) is not None
    assert asyncio.run(tool.call("  Drournix ")) == first


def test_remote_retriever_gives_the_same_results():
    app = create_app(Index.from_documents(list(read_corpus("envs/data/fictional/corpus.jsonl"))))
    with serve_app(app) as url:
        remote = search("Laskam Glimbys", {"server_url": url, "topk": 2})
    assert remote.status == "ok"
    assert remote.observation.text == search("Laskam Glimbys", {"topk": 2}).observation.text


def test_unreachable_retriever_is_an_infra_error():
    result = search("anything", {"server_url": f"http://127.0.0.1:{free_port()}", "attempts": 2})
    assert result.status == "infra_error" and "failed after retries" in result.error
