"""Sandbox throughput and latency, warm pool vs a fresh sandboxed process per call (how peers run
code), for trivial code and for code importing numpy, in one run. Both use the same bubblewrap
isolation (namespaces, seccomp, rlimits, tmpfs); the fresh method starts bwrap + Python per call.

    .venv/bin/python bench/sandbox.py [--calls 200] [--concurrency 2]

``--compare-with DIR`` measures only the warm pool, alternating between this checkout's sandbox
and the one in DIR (e.g. ``git worktree add /tmp/sb-old <commit>``, then ``/tmp/sb-old/sandbox``),
each in its own process, ``--repeats`` times, and prints the throughput ratio of each pair.
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


def pool_only(calls: int, concurrency: int) -> dict[str, list[float]]:
    backend = BwrapBackend(pool_size=concurrency)
    try:
        for code in CASES.values():
            for _ in range(10):
                pooled_run(backend, code)
        return {name: list(measure(pooled_run, backend, code, calls, concurrency)) for name, code in CASES.items()}
    finally:
        backend.close()


def compare(directory: str, calls: int, concurrency: int, repeats: int) -> None:
    """Old and new warm pools, interleaved so both see the same machine load."""
    print(f"warm pool, {calls} calls per row, {concurrency} at a time; baseline: {directory}")
    print(f"{'repeat':<8}{'code':<9}{'baseline runs/s':>16}{'this runs/s':>13}{'ratio':>8}{'p50 ms':>14}")
    ratios: dict[str, list[float]] = {name: [] for name in CASES}
    for repeat in range(repeats):
        figures = {}
        for label, extra in (("baseline", ["--sandbox-dir", directory]), ("this", [])):
            output = subprocess.run([sys.executable, __file__, "--pool-only", "--calls", str(calls), "--concurrency",
                                     str(concurrency), *extra], capture_output=True, text=True, check=True).stdout
            figures[label] = json.loads(output.splitlines()[-1])
        for name in CASES:
            old, new = figures["baseline"][name], figures["this"][name]
            ratios[name].append(new[0] / old[0])
            print(f"{repeat:<8}{name:<9}{old[0]:>16.1f}{new[0]:>13.1f}{new[0] / old[0]:>8.2f}"
                  f"{old[1]:>7.1f}/{new[1]:<6.1f}")
    for name, values in ratios.items():
        print(f"{name}: this/baseline throughput {min(values):.2f} to {max(values):.2f} "
              f"(median {statistics.median(values):.2f}) over {repeats} pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--compare-with", metavar="DIR", help="another checkout's sandbox/ directory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sandbox-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pool_only:
        print(json.dumps(pool_only(args.calls, args.concurrency)))
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
