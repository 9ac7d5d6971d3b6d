"""The Docker backend: each execution in a throw-away container with no network, a read-only root,
a non-root user and memory, pid and CPU limits (the ``docker`` SDK; ``pip install agentrl[docker]``).

Used only when configured and when a Docker engine answers; otherwise :class:`SandboxUnavailable`.
"""

from __future__ import annotations

import base64
import time

from agentrl.sandbox.base import DEFAULT_MAX_OUTPUT_BYTES, Backend, RunResult, SandboxUnavailable

TRUNCATED = "\n[... output truncated: {} more bytes ...]\n"


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
        self.image = image
        self.max_processes = max_processes
        self.cpus = cpus
        self.max_output_bytes = max_output_bytes
        self.tmpfs_mb = tmpfs_mb

    def run(self, code: str, stdin: str = "", files: dict[str, bytes] | None = None, timeout: float = 10.0,
            memory_mb: int = 512) -> RunResult:
        script = (
            "import base64, io, os, sys\n"
            f"sys.stdin = io.StringIO({stdin!r})\n"
            f"files = {{k: base64.b64decode(v) for k, v in {({k: base64.b64encode(v).decode() for k, v in (files or {}).items()})!r}.items()}}\n"
            "for name, data in files.items():\n"
            "    open(os.path.join('/work', name), 'wb').write(data)\n"
            f"exec(compile({code!r}, 'main.py', 'exec'), {{'__name__': '__main__'}})\n"
        )
        started = time.monotonic()
        container = self.client.containers.create(
            self.image, ["python", "-c", script], network_mode="none", read_only=True, user="65534:65534",
            mem_limit=f"{memory_mb}m", memswap_limit=f"{memory_mb}m", pids_limit=self.max_processes,
            nano_cpus=int(self.cpus * 1e9), tmpfs={"/work": f"size={self.tmpfs_mb}m", "/tmp": "size=16m"},
            working_dir="/work", cap_drop=["ALL"], security_opt=["no-new-privileges"],
            environment={"HOME": "/work"},
        )
        try:
            container.start()
            timed_out = False
            try:
                status = container.wait(timeout=timeout)
                return_code = status.get("StatusCode")
            except Exception:
                timed_out, return_code = True, None
                container.kill()
            stdout = container.logs(stdout=True, stderr=False)
            stderr = container.logs(stdout=False, stderr=True)
            state = container.attrs.get("State", {}) if not timed_out else {}
        finally:
            container.remove(force=True)
        return RunResult(
            stdout=self._cap(stdout), stderr=self._cap(stderr), return_code=return_code, timed_out=timed_out,
            memory_exceeded=bool(state.get("OOMKilled")) or b"MemoryError" in stderr[-2000:],
            duration_s=time.monotonic() - started,
        )

    def _cap(self, data: bytes) -> str:
        extra = len(data) - self.max_output_bytes
        text = data[: self.max_output_bytes].decode("utf-8", "replace")
        return text + TRUNCATED.format(extra) if extra > 0 else text
