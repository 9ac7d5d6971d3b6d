"""Tool-server throughput: calls/s and p50/p99 latency for a no-op tool over HTTP on 127.0.0.1 at
concurrency 1, 32 and 256, the server in its own process and the load from wrk (Debian package
``wrk``) in another, each level for a fixed duration.

    apt-get install wrk
    .venv/bin/python bench/tool_server.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.test_tool_server import free_port, start_server  # noqa: E402

SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
counter = 0
request = function()
  counter = counter + 1
  local body = '{"requests": [{"trajectory_id": "t' .. (counter % 64) .. '", "tool": "no_op", "arguments": {"x": ' .. counter .. '}}]}'
  return wrk.format(nil, "/call", nil, body)
end
"""


def milliseconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"cannot read wrk's latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[unit]


def run_wrk(url: str, concurrency: int, seconds: int, script: str) -> tuple[float, float, float, int]:
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{seconds}s", "--latency", "-s", script, url],
        capture_output=True, text=True, check=True,
    ).stdout
    try:
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        # anchored: the thread-stats lines end in percentages such as "82.50%" too
        p50 = milliseconds(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
        p99 = milliseconds(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
    except (AttributeError, ValueError) as error:
        raise RuntimeError(f"unexpected wrk output ({error}):\n{out}") from None
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, p50, p99, int(errors.group(1)) if errors else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("this benchmark needs wrk: apt-get install wrk")
    os.environ["PYTHONPATH"] = str(ROOT)
    port = free_port()
    process = start_server(port)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(SCRIPT)
    try:
        url = f"http://127.0.0.1:{port}"
        run_wrk(url, 8, 1, handle.name)  # warm-up
        print(f"{'concurrency':>11}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
        for concurrency in (1, 32, 256):
            rate, p50, p99, errors = run_wrk(url, concurrency, args.seconds, handle.name)
            print(f"{concurrency:>11}{rate:>10.0f}{p50:>9.2f}{p99:>9.2f}{errors:>8}")
    finally:
        process.kill()
        process.wait()
        os.unlink(handle.name)


if __name__ == "__main__":
    main()
