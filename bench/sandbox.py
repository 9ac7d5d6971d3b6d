"""Sandbox throughput and latency, warm pool vs a fresh sandboxed process per call (how peers run
code), for trivial code and for code importing numpy, in one run. Both use the same bubblewrap
isolation (namespaces, seccomp, rlimits, tmpfs); the fresh method starts bwrap + Python per call.

    .venv/bin/python bench/sandbox.py [--calls 200] [--concurrency 2]

``--compare-with DIR`` measures only the warm pool: this checkout's sandbox against the one in DIR
(e.g. ``git worktree add /tmp/sb-old <commit>``, then ``/tmp/sb-old/sandbox``), each held warm in
its own process and measured in alternating blocks of ``--calls`` calls for ``--repeats`` rounds,
and prints the throughput ratio of adjacent blocks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--sandbox-dir" in sys.argv:  # load agentrl.sandbox from another checkout (the comparison's baseline)
    _dir = sys.argv[sys.argv.index("--sandbox-dir") + 1]
    _spec = importlib.util.spec_from_file_location("agentrl.sandbox", f"{_dir}/__init__.py", submodule_search_locations=[_dir])
    sys.modules["agentrl.sandbox"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["agentrl.sandbox"])
from agentrl.sandbox.bwrap import BwrapBackend, seccomp_program  # noqa: E402

CASES = {"trivial": "print(1 + 1)", "numpy": "import numpy as np\nprint(np.arange(10).sum())"}


def fresh_run(backend: BwrapBackend, code: str) -> float:
    """One bwrap + interpreter per call, with the same isolation flags and seccomp filter as the pool."""
    started = time.perf_counter()
    read_end, write_end = os.pipe()
    os.write(write_end, seccomp_program())
    os.close(write_end)
    command = backend.command("pool", seccomp_fd=read_end)
    command = command[: command.index(str(backend.interpreter)) + 1] + ["-s", "-S", "-c", code]
    try:
        result = subprocess.run(command, capture_output=True, text=True, pass_fds=(read_end,))
    finally:
        os.close(read_end)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    return time.perf_counter() - started


def pooled_run(backend: BwrapBackend, code: str) -> float:
    started = time.perf_counter()
    result = backend.run(code)
    assert result.ok, result
    return time.perf_counter() - started


def measure(method, backend, code, calls, concurrency) -> tuple[float, float, float]:
    with ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        latencies = list(pool.map(lambda _: method(backend, code), range(calls)))
        elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100)
    return calls / elapsed, cuts[49] * 1e3, cuts[98] * 1e3


def serve(concurrency: int, uid_base: int) -> None:
    """Hold a warm pool; for each line ``<case> <calls>`` on stdin, measure and answer in JSON."""
    backend = BwrapBackend(pool_size=concurrency, uid_base=uid_base)
    try:
        for code in CASES.values():
            for _ in range(20):
                pooled_run(backend, code)
        print("ready", flush=True)
        for line in sys.stdin:
            name, calls = line.split()
            print(json.dumps(measure(pooled_run, backend, CASES[name], int(calls), concurrency)), flush=True)
    finally:
        backend.close()


def compare(directory: str, calls: int, concurrency: int, repeats: int) -> None:
    """The baseline's warm pool and this one, each held warm in its own process, measured in
    alternating blocks of ``calls`` calls (the order flips every round) so both see the same
    machine load; the ratio is taken per adjacent pair."""
    processes = {}
    # Apart uid ranges: a baseline from before uid leases would share this one's uids (and process limit).
    for label, extra in (("baseline", ["--sandbox-dir", directory, "--uid-base", "64000"]), ("this", ["--uid-base", "66000"])):
        processes[label] = subprocess.Popen([sys.executable, __file__, "--serve", "--concurrency", str(concurrency), *extra],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert processes[label].stdout.readline().strip() == "ready"

    def block(label: str, name: str) -> tuple[float, float, float]:
        processes[label].stdin.write(f"{name} {calls}\n")
        processes[label].stdin.flush()
        return tuple(json.loads(processes[label].stdout.readline()))

    print(f"warm pool, blocks of {calls} calls, {concurrency} at a time, {repeats} rounds; baseline: {directory}")
    try:
        for name in CASES:
            ratios, rates = [], {"baseline": [], "this": []}
            for round_ in range(repeats):
                order = ("baseline", "this") if round_ % 2 == 0 else ("this", "baseline")
                figures = {label: block(label, name) for label in order}
                for label in rates:
                    rates[label].append(figures[label][0])
                ratios.append(figures["this"][0] / figures["baseline"][0])
            print(f"{name:<8} baseline {statistics.median(rates['baseline']):6.1f} runs/s "
                  f"({min(rates['baseline']):.0f}-{max(rates['baseline']):.0f})   this {statistics.median(rates['this']):6.1f} "
                  f"runs/s ({min(rates['this']):.0f}-{max(rates['this']):.0f})   ratio median {statistics.median(ratios):.2f} "
                  f"(pairs {min(ratios):.2f}-{max(ratios):.2f})")
    finally:
        for process in processes.values():
            process.stdin.close()
            process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--compare-with", metavar="DIR", help="another checkout's sandbox/ directory")
    parser.add_argument("--repeats", type=int, default=10, help="rounds of --compare-with")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sandbox-dir", help=argparse.SUPPRESS)
    parser.add_argument("--uid-base", type=int, default=61000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.concurrency, args.uid_base)
        return
    if args.compare_with:
        compare(args.compare_with, args.calls, args.concurrency, args.repeats)
        return
    backend = BwrapBackend(pool_size=args.concurrency)
    try:
        for code in CASES.values():  # warm-up
            pooled_run(backend, code)
            fresh_run(backend, code)
        print(f"{args.calls} calls per row, {args.concurrency} at a time")
        print(f"{'code':<9}{'method':<24}{'runs/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
        for name, code in CASES.items():
            pooled = measure(pooled_run, backend, code, args.calls, args.concurrency)
            fresh = measure(fresh_run, backend, code, args.calls, args.concurrency)
            for method, (rate, p50, p99) in (("warm pool", pooled), ("fresh process per call", fresh)):
                print(f"{name:<9}{method:<24}{rate:>8.1f}{p50:>9.1f}{p99:>9.1f}")
            print(f"{name:<9}{'speed-up':<24}{pooled[0] / fresh[0]:>7.1f}x")
    finally:
        backend.close()


if __name__ == "__main__":
    main()
