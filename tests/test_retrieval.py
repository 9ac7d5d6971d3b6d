"""Retrieval: the passage holding the answer ranks first; the server speaks the Search-R1 protocol."""

import asyncio
import json

import httpx
import pytest

from agentrl.retrieval.index import Index, read_corpus
from agentrl.retrieval.server import create_app
from tests.helpers.servers import serve_app

DATA = "envs/data/fictional"


def questions(hops=1):
    with open(f"{DATA}/eval.jsonl") as handle:
        return [q for q in map(json.loads, handle) if q["hops"] == hops]


@pytest.fixture(scope="module")
def bm25_index():
    return Index.from_documents(list(read_corpus(f"{DATA}/corpus.jsonl")))


def test_answer_passage_ranks_first_for_single_hop_questions(bm25_index):
    qs = questions()
    hits = bm25_index.search([q["question"] for q in qs], topk=1)
    first = [h[0].document["contents"] for h in hits]
    rate = sum(q["entity"] in doc and q["golden_answers"][0] in doc for q, doc in zip(qs, first)) / len(qs)
    assert rate >= 0.95, rate
    assert first[0].startswith(qs[0]["entity"] + "\n")


def test_both_corpus_formats_are_read(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "a", "contents": "Title A\\nbody a"}\n{"id": "b", "title": "Title B", "text": "body b"}\n')
    assert list(read_corpus(path)) == [{"id": "a", "contents": "Title A\nbody a"}, {"id": "b", "contents": "Title B\nbody b"}]


def test_built_index_loads_memory_mapped_and_agrees(tmp_path, bm25_index):
    out = Index.build(f"{DATA}/corpus.jsonl", tmp_path / "idx", show_progress=False)
    loaded = Index.load(out)
    query = [questions()[3]["question"]]
    assert [h.document for h in loaded.search(query, 3)[0]] == [h.document for h in bm25_index.search(query, 3)[0]]
    assert len(loaded) == len(bm25_index)


def test_loading_a_non_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="agentrl index build"):
        Index.load(tmp_path)


@pytest.mark.parametrize("method", ["dense", "hybrid"])
def test_dense_and_hybrid_find_the_passage(method):
    documents = [
        {"id": "0", "contents": "Oranges\nOranges are citrus fruits rich in vitamin C."},
        {"id": "1", "contents": "Volcanoes\nA volcano erupts molten rock called lava."},
        {"id": "2", "contents": "Chess\nChess is a board game for two players."},
    ]
    index = Index.from_documents(documents, method)
    assert index.search(["what comes out of an erupting mountain"], 1)[0][0].document["id"] == "1"
    assert index.search(["board games"], 2)[0][0].document["id"] == "2"


def test_server_protocol_with_and_without_scores(bm25_index):
    with serve_app(create_app(bm25_index)) as url:
        with_scores = httpx.post(f"{url}/retrieve", json={"queries": ["Laskam Glimbys", "Drournix"], "topk": 2, "return_scores": True}).json()
        without = httpx.post(f"{url}/retrieve", json={"queries": ["Laskam Glimbys"], "topk": 2}).json()
    assert set(with_scores) == {"result"} and len(with_scores["result"]) == 2
    item = with_scores["result"][0][0]
    assert set(item) == {"document", "score"} and set(item["document"]) == {"id", "contents"}
    assert isinstance(item["score"], float) and item["document"]["contents"].startswith("Laskam Glimbys\n")
    assert without["result"][0][0] == item["document"]  # without scores the items are the documents
    assert len(without["result"][0]) == 2


@pytest.mark.parametrize(
    "payload",
    [{"queries": []}, {"queries": [1, 2]}, {"queries": ["x"], "topk": 0}, {"queries": ["x"], "topk": 100000},
     {"queries": ["  "]}, {"topk": 3}],
)
def test_bad_requests_get_422_with_a_message(bm25_index, payload):
    with serve_app(create_app(bm25_index)) as url:
        response = httpx.post(f"{url}/retrieve", json=payload)
    assert response.status_code == 422 and response.json()["detail"][0]["msg"]


def test_concurrent_requests_are_batched_and_all_correct(bm25_index):
    qs = questions()[:60]
    app = create_app(bm25_index)

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            responses = await asyncio.gather(*(client.post("/retrieve", json={"queries": [q["question"]], "topk": 1}) for q in qs))
        return [r.json()["result"][0][0]["contents"] for r in responses]

    with serve_app(app) as url:
        first = asyncio.run(main(url))
    assert all(q["entity"] in doc for q, doc in zip(qs, first))
    assert app.state.batcher.batches < len(qs)  # several requests shared a batch


def test_batched_bm25_scores_equal_bm25s_own_retrieval(bm25_index):
    from agentrl.retrieval.index import _tokenize

    queries = [q["question"] for q in questions()[:40]]
    ours = bm25_index.search(queries, 5)
    indices, scores = bm25_index.bm25.retrieve(_tokenize(queries), k=5, show_progress=False)
    for row, hits in enumerate(ours):
        assert [h.score for h in hits] == pytest.approx(scores[row].tolist(), rel=1e-5)
        assert hits[0].document == bm25_index.documents[int(indices[row][0])]


def test_two_worker_processes_serve_the_same_index(tmp_path):
    """`agentrl serve retriever --workers 2`: both processes answer correctly on one port, and
    stopping the command stops them all."""
    import os
    import signal
    import subprocess
    import time

    from tests.helpers.servers import free_port, start_cli_server

    Index.build(f"{DATA}/corpus.jsonl", tmp_path / "index", "bm25", show_progress=False)
    port = free_port()
    process = start_cli_server(["serve", "retriever", "--index", str(tmp_path / "index"), "--workers", "2"], port,
                               timeout=60, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        qs = questions()[:40]

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
                return await asyncio.gather(*(client.post("/retrieve", json={"queries": [q["question"]], "topk": 1}) for q in qs))

        responses = asyncio.run(main())
        assert all(q["entity"] in r.json()["result"][0][0]["contents"] for q, r in zip(qs, responses))
        children = subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 3  # the supervisor and its two workers
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker exits a moment after the workers
    while subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "server processes outlived the command"
        time.sleep(0.2)


def test_documents_tied_at_the_last_place_are_chosen_the_same_way_in_every_process(bm25_index):
    """The vocabulary's term ids follow string hashing, so they differ between processes; which of
    the documents tied at the k-th score are returned must not. Ties go to the earlier document."""
    import os
    import subprocess
    import sys

    query, k = "city in the country of Zanunpoth", 8
    scores = [h.score for h in bm25_index.search([query], k + 8)[0]]
    assert scores[k - 1] == scores[k]  # the query has a tie across the cut
    program = ("import json, sys; from agentrl.retrieval.index import Index, read_corpus; "
               f"index = Index.from_documents(list(read_corpus('{DATA}/corpus.jsonl'))); "
               f"print(json.dumps([h.document['id'] for h in index.search([{query!r}], {k})[0]]))")
    answers = set()
    for seed in ("1", "2", "3"):
        result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        answers.add(result.stdout.strip().splitlines()[-1])
    assert len(answers) == 1
    ids = [d["id"] for d in bm25_index.documents]
    tied = [h.document["id"] for h in bm25_index.search([query], 40)[0] if h.score == scores[k - 1]]
    chosen = json.loads(answers.pop())
    assert [i for i in chosen if i in tied] == sorted(tied, key=ids.index)[: len([i for i in chosen if i in tied])]
