"""The Docker backend: each execution in a throw-away container with no network, a read-only root,
a non-root user, no capabilities and memory, pid and CPU limits (the ``docker`` SDK;
``pip install agentrl[docker]``).

Used only when configured and when a Docker engine answers; otherwise :class:`SandboxUnavailable`.
There is no warm pool: every call pays a container start, so prefer ``bwrap`` where it runs.
"""

from __future__ import annotations

import base64
import json
import time

from agentrl.sandbox.base import DEFAULT_MAX_OUTPUT_BYTES, Backend, RunResult, SandboxUnavailable
from agentrl.sandbox.worker import MARK as TRUNCATED

# Runs inside the container: stdin and files come in as arguments, then the user's code as __main__.
LAUNCHER = """
import base64, io, json, os, sys
job = json.loads(base64.b64decode(sys.argv[1]))
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
        argument = base64.b64encode(json.dumps(job).encode()).decode()
        started = time.monotonic()
        container = self.client.containers.create(
            self.image, ["python", "-I", "-c", LAUNCHER, argument], network_mode="none", read_only=True,
            user="65534:65534", mem_limit=f"{memory_mb}m", memswap_limit=f"{memory_mb}m",
            pids_limit=self.max_processes, nano_cpus=int(self.cpus * 1e9),
            tmpfs={"/work": f"size={self.tmpfs_mb}m,mode=1777", "/tmp": "size=16m,mode=1777"},
            working_dir="/work", cap_drop=["ALL"], security_opt=["no-new-privileges"],
            environment={"HOME": "/work", "LANG": "C.UTF-8"},
            # the engine keeps at most this much of the output on disk, whatever the code prints
            log_config=LogConfig(type="json-file", config={"max-size": f"{max(self.max_output_bytes * 4, 1 << 20)}"}),
        )
        try:
            container.start()
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

    def _read_capped(self, container, stdout: bool, stderr: bool) -> str:
        """Stream the logs and keep ``max_output_bytes``: gigabytes of output never reach memory."""
        kept, dropped = bytearray(), 0
        for chunk in container.logs(stdout=stdout, stderr=stderr, stream=True, follow=False):
            room = self.max_output_bytes - len(kept)
            kept += chunk[:max(room, 0)]
            dropped += max(len(chunk) - max(room, 0), 0)
        text = kept.decode("utf-8", "replace")
        return text + TRUNCATED.format(dropped) if dropped else text
