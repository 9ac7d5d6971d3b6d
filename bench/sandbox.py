"""Sandbox throughput and latency, warm pool vs a fresh sandboxed process per call (how peers run
code), for trivial code and for code importing numpy, in one run. Both use the same bubblewrap
isolation (namespaces, seccomp, rlimits, tmpfs); the fresh method starts bwrap + Python per call.

    .venv/bin/python bench/sandbox.py [--calls 200] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
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
