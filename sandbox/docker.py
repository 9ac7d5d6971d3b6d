"""The Docker backend: each execution in a throw-away container with no network, a read-only root,
a non-root user, no capabilities and memory, pid and CPU limits (the ``docker`` SDK;
``pip install agentrl[docker]``).

Used only when configured and when a Docker engine answers; otherwise :class:`SandboxUnavailable`.
There is no warm pool: every call pays a container start, so prefer ``bwrap`` where it runs.

The job (code, stdin, files) reaches the container on its standard input, through the engine's
attach socket, never on the command line (whose ``ARG_MAX`` would refuse a job over about 128 KiB):
the container is created with ``stdin_open`` (and so ``StdinOnce``), attached before it starts,
and the end of the job is the end of its stdin.
"""

from __future__ import annotations

import base64
import json
import socket
import time

from agentrl.sandbox.base import DEFAULT_MAX_OUTPUT_BYTES, Backend, RunResult, SandboxUnavailable
from agentrl.sandbox.worker import MARK as TRUNCATED

# Runs inside the container: the job arrives as JSON on stdin (read to its end), then the user's
# code runs as __main__ with the job's stdin.
LAUNCHER = """
import base64, io, json, os, sys
job = json.loads(sys.stdin.buffer.read())
sys.stdin = io.StringIO(job["stdin"])
for name, data in job["files"].items():
    path = os.path.normpath(os.path.join("/work", name))
    if not path.startswith("/work/"):
        sys.exit(f"file name {name!r} leaves the work directory")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(base64.b64decode(data))
sys.argv = ["main.py"]
exec(compile(job["code"], "main.py", "exec"), {"__name__": "__main__"})
"""


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, image: str = "python:3.11-slim", max_processes: int = 64, cpus: float = 1.0,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, tmpfs_mb: int = 64) -> None:
        try:
            import docker
        except ImportError:
            raise SandboxUnavailable("the docker backend needs the docker SDK: pip install 'agentrl[docker]'") from None
        try:
            self.client = docker.from_env()
            self.client.ping()
        except Exception as error:
            raise SandboxUnavailable(f"no Docker engine is reachable ({error}); start one or choose the bwrap backend") from None
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            raise SandboxUnavailable(f"the docker backend's image {image!r} is not present: docker pull {image}") from None
        self.image = image
        self.max_processes = max_processes
        self.cpus = cpus
        self.max_output_bytes = max_output_bytes
        self.tmpfs_mb = tmpfs_mb

    def run(self, code: str, stdin: str = "", files: dict[str, bytes] | None = None, timeout: float = 10.0,
            memory_mb: int = 512, language: str = "python", fetch_files: list[str] | tuple[str, ...] = ()) -> RunResult:
        from docker.types import LogConfig

        if language not in ("python", "python3"):
            raise SandboxUnavailable(f"language {language!r} is not supported by the docker backend; supported: python")
        if fetch_files:
            raise SandboxUnavailable("the docker backend cannot fetch files; use the bwrap backend")

        job = {"code": code, "stdin": stdin, "files": {k: base64.b64encode(v).decode() for k, v in (files or {}).items()}}
        payload = json.dumps(job).encode()
        started = time.monotonic()
        container = self.client.containers.create(
            self.image, ["python", "-I", "-c", LAUNCHER], network_mode="none", read_only=True,
            stdin_open=True,  # with the SDK's default detach=False this also sets StdinOnce: EOF ends stdin
            user="65534:65534", mem_limit=f"{memory_mb}m", memswap_limit=f"{memory_mb}m",
            pids_limit=self.max_processes, nano_cpus=int(self.cpus * 1e9),
            tmpfs={"/work": f"size={self.tmpfs_mb}m,mode=1777", "/tmp": "size=16m,mode=1777"},
            working_dir="/work", cap_drop=["ALL"], security_opt=["no-new-privileges"],
            environment={"HOME": "/work", "LANG": "C.UTF-8"},
            # the engine keeps at most this much of the output on disk, whatever the code prints
            log_config=LogConfig(type="json-file", config={"max-size": f"{max(self.max_output_bytes * 4, 1 << 20)}"}),
        )
        try:
            attached = container.attach_socket(params={"stdin": 1, "stream": 1})
            raw = getattr(attached, "_sock", attached)  # the SDK hands back a SocketIO over the socket
            try:
                container.start()
                self._send_job(raw, payload, timeout)
            finally:
                attached.close()
                raw.close()
            timed_out = False
            try:
                return_code = container.wait(timeout=timeout).get("StatusCode")
            except Exception:  # the engine's read timeout: the code overran
                timed_out, return_code = True, None
                container.kill()
            stdout = self._read_capped(container, stdout=True, stderr=False)
            stderr = self._read_capped(container, stdout=False, stderr=True)
            container.reload()
            oom_killed = bool(container.attrs.get("State", {}).get("OOMKilled"))
        finally:
            container.remove(force=True)
        return RunResult(
            stdout=stdout, stderr=stderr, return_code=return_code, timed_out=timed_out,
            memory_exceeded=oom_killed or "MemoryError" in stderr[-2000:], duration_s=time.monotonic() - started,
        )

    @staticmethod
    def _send_job(raw, payload: bytes, timeout: float) -> None:
        """Write the job to the container's stdin and end it: a half-close, or else closing the
        attach; either way ``StdinOnce`` makes the engine close the container's stdin. A container
        that dies first (its memory limit, say) refuses the rest; that is its result, read from its
        state and logs as usual."""
        raw.settimeout(timeout)
        try:
            raw.sendall(payload)
            raw.shutdown(socket.SHUT_WR)
        except (OSError, AttributeError):  # a broken pipe or the timeout; a transport with no half-close
            pass

    def _read_capped(self, container, stdout: bool, stderr: bool) -> str:
        """Stream the logs and keep ``max_output_bytes``: gigabytes of output never reach memory."""
        kept, dropped = bytearray(), 0
        for chunk in container.logs(stdout=stdout, stderr=stderr, stream=True, follow=False):
            room = self.max_output_bytes - len(kept)
            kept += chunk[:max(room, 0)]
            dropped += max(len(chunk) - max(room, 0), 0)
        text = kept.decode("utf-8", "replace")
        return text + TRUNCATED.format(dropped) if dropped else text
