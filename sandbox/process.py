"""The plain-process backend: the same warm workers and rlimits as bubblewrap, without namespaces.

For trusted code only (your own evaluation scripts, a machine without bubblewrap): the code sees
the host's filesystem and network. It is never chosen unless configured by name.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from agentrl.sandbox.base import DEFAULT_MAX_OUTPUT_BYTES
from agentrl.sandbox.pool import PooledBackend

WORKER = Path(__file__).with_name("worker.py")


class ProcessBackend(PooledBackend):
    name = "process"

    def __init__(self, pool_size: int = 2, max_processes: int = 256, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
                 preload: tuple[str, ...] = ("numpy",), tmpfs_mb: int = 64, session_ttl_s: float = 600.0) -> None:
        super().__init__(pool_size, max_processes, tmpfs_mb, None, max_output_bytes, session_ttl_s)
        self.preload = preload
        self._roots: list[str] = []
        self._replenish()

    def command(self, mode: str, memory_mb: int = 512) -> list[str]:
        return [sys.executable, "-s", str(WORKER), mode, str(memory_mb), *(self.preload if mode == "pool" else ())]

    def environment(self) -> dict[str, str]:
        root = tempfile.mkdtemp(prefix="agentrl-process-sandbox-")
        self._roots.append(root)
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": root, "LANG": "C.UTF-8",
                "AGENTRL_SANDBOX_ROOT": root, "OPENBLAS_NUM_THREADS": "1"}

    def close(self) -> None:
        super().close()
        for root in self._roots:
            shutil.rmtree(root, ignore_errors=True)
