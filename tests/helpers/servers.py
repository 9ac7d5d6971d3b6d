"""Servers on 127.0.0.1 for tests and benchmarks: an ASGI app in a background thread, or an
``agentrl`` CLI server in its own process, each returned once its health endpoint answers."""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen | None = None, timeout: float = 30.0,
                    health: str = "/health") -> None:
    """Return once ``url + health`` answers 200; raise if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + health, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process is not None and process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"the server exited with {process.returncode} before answering {health}\n{stderr}")
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer {health} within {timeout:.0f} s")


def start_cli_server(args: list[str], port: int, timeout: float = 30.0, **popen) -> subprocess.Popen:
    """``python -m agentrl.cli ARGS --port PORT`` from this checkout, returned once healthy."""
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen([sys.executable, "-m", "agentrl.cli", *args, "--port", str(port)],
                               env=dict(os.environ, PYTHONPATH=str(root)), **popen)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", process, timeout)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


@contextlib.contextmanager
def serve_app(app, health: str = "/health"):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, timeout=20, health=health)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
