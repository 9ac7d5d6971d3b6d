"""Retrieval throughput and latency on a 100k-passage synthetic corpus, in one run:

- queries/s through the HTTP server (`agentrl serve retriever`, its own process) with micro-batching
  vs the same server answering one request at a time without batching, load from wrk on 127.0.0.1;
- in-process latency of BM25 and dense search (dense over a subset: embedding 100k passages on two
  CPU cores takes long; the subset size is printed).

    apt-get install wrk
    .venv/bin/python bench/retrieval.py [--passages 100000] [--dense-passages 10000] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from agentrl.retrieval.index import Index, read_corpus  # noqa: E402
from bench.tool_server import run_wrk  # noqa: E402
from tests.helpers.servers import free_port, start_cli_server  # noqa: E402

SYLLABLES = ["ka", "lo", "mi", "zu", "ther", "vin", "dra", "quo", "sel", "bri", "nox", "tal", "pem", "ru", "gha", "fen"]
TOPICS = ["river", "mill", "harbour", "guild", "tower", "orchard", "market", "bridge", "library", "forge"]


def synthetic_corpus(path: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` passages about invented places; returns one query per passage (its title)."""
    rng = random.Random(seed)
    titles = []
    with path.open("w") as handle:
        for i in range(count):
            title = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize() + f" {rng.choice(TOPICS)} {i}"
            words = " ".join(rng.choice(SYLLABLES) + rng.choice(SYLLABLES) for _ in range(40))
            handle.write(json.dumps({"id": str(i), "contents": f"{title}\n{title} is known for {words}."}) + "\n")
            titles.append(title)
    return titles


def wrk_script(queries: list[str], path: Path) -> None:
    bodies = [json.dumps({"queries": [q], "topk": 3}) for q in queries]
    lines = ["wrk.method = 'POST'", "wrk.headers['Content-Type'] = 'application/json'", "bodies = {"]
    lines += [f"  [[{b}]]," for b in bodies]
    lines += ["}", "counter = 0", "request = function()", "  counter = counter + 1",
              "  return wrk.format(nil, '/retrieve', nil, bodies[(counter % #bodies) + 1])", "end"]
    path.write_text("\n".join(lines))


def start(index_dir: Path, batching: bool, workers: int = 1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = ["serve", "retriever", "--index", str(index_dir), "--workers", str(workers)]
    process = start_cli_server(args + ([] if batching else ["--no-batching"]), port, timeout=60)
    return process, f"http://127.0.0.1:{port}"


def latency_ms(index: Index, queries: list[str], repeats: int = 200) -> tuple[float, float]:
    timings = []
    for query in queries[:repeats]:
        started = time.perf_counter()
        index.search([query], 3)
        timings.append((time.perf_counter() - started) * 1e3)
    cuts = statistics.quantiles(timings, n=100)
    return cuts[49], cuts[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--dense-passages", type=int, default=2_000)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agentrl-bench-"))
    titles = synthetic_corpus(work / "corpus.jsonl", args.passages)
    started = time.perf_counter()
    Index.build(work / "corpus.jsonl", work / "bm25", "bm25", show_progress=False)
    print(f"corpus: {args.passages} passages; BM25 index built in {time.perf_counter() - started:.1f} s")
    queries = random.Random(1).sample(titles, 2000)
    wrk_script(queries, work / "load.lua")

    print(f"HTTP, {args.concurrency} connections, {args.seconds} s each, wrk on 127.0.0.1:")
    print(f"{'server':<28}{'queries/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    rates = {}
    for batching, workers in ((True, 1), (True, 2), (False, 1)):
        process, url = start(work / "bm25", batching, workers)
        try:
            run_wrk(url, 8, 1, str(work / "load.lua"))  # warm-up
            rate, p50, p99, errors = run_wrk(url, args.concurrency, args.seconds, str(work / "load.lua"))
        finally:
            process.terminate()  # uvicorn's supervisor stops its worker processes on SIGTERM
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        name = ("micro-batched" if batching else "one request at a time") + (f", {workers} workers" if workers > 1 else "")
        rates[batching, workers] = rate
        print(f"{name:<28}{rate:>10.0f}{p50:>9.2f}{p99:>9.2f}{errors:>8}")
    print(f"micro-batching speed-up: {rates[True, 1] / rates[False, 1]:.2f}x (1 worker), "
          f"{rates[True, 2] / rates[False, 1]:.2f}x (2 workers)")

    bm25 = Index.load(work / "bm25")
    p50, p99 = latency_ms(bm25, queries)
    print(f"in-process BM25 ({args.passages} passages), one query: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    started = time.perf_counter()
    batch = bm25.search(queries[:512], 3)
    per_query = (time.perf_counter() - started) / 512 * 1e3
    print(f"in-process BM25, batch of 512: {per_query:.3f} ms per query")
    hits = sum(h[0].document["contents"].startswith(q) for q, h in zip(queries[:512], batch))
    print(f"BM25 top-1 is the queried passage for {hits}/512 queries")

    if args.dense_passages <= 0:
        return
    documents = list(read_corpus(work / "corpus.jsonl"))[: args.dense_passages]
    started = time.perf_counter()
    dense = Index.from_documents(documents, "dense")
    print(f"dense index ({len(documents)} passages, MiniLM-L6 + faiss flat) built in {time.perf_counter() - started:.1f} s")
    dense_queries = [d["contents"].split("\n")[0] for d in documents[:200]]
    p50, p99 = latency_ms(dense, dense_queries)
    print(f"in-process dense ({len(documents)} passages), one query: p50 {p50:.2f} ms, p99 {p99:.2f} ms")


if __name__ == "__main__":
    main()
