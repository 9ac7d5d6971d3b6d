"""Per-sandbox memory limits with cgroup v2, where a cgroup is delegated to this process.

With a cgroup, a sandbox's ``memory_mb`` bounds the sum over all its processes (RLIMIT_AS bounds
each process only, so a job that forks may hold ``max_processes`` times as much). Delegation means
a cgroup-v2 directory that this process may write, with ``memory`` enabled in its
``cgroup.subtree_control``: the ``AGENTRL_SANDBOX_CGROUP`` directory if set, else this process's
own cgroup. Where there is none (cgroup v1, a container without a writable cgroup) nothing fails:
``delegated_cgroup`` answers ``None``, RLIMIT_AS stays the only bound, and the sandbox server's
admission control keeps the limits granted at once within its memory budget.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
BASELINE_MB = 64  # the sandbox's own supervisor and zygote, on top of the job's limit
_names = itertools.count()


def delegated_cgroup(explicit: str | None = None) -> Path | None:
    """The cgroup-v2 directory under which sandboxes get their own cgroups, or ``None``."""
    try:
        explicit = explicit or os.environ.get("AGENTRL_SANDBOX_CGROUP")
        if explicit:
            parent = Path(explicit)
        else:
            if not (CGROUP_ROOT / "cgroup.controllers").is_file():
                return None  # cgroup v1 or hybrid: not delegated to unprivileged users
            own = next(line for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
            parent = CGROUP_ROOT / own[3:].strip().lstrip("/")
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            return None
        return parent if os.access(parent, os.W_OK | os.X_OK) else None
    except (OSError, StopIteration):
        return None


class SandboxCgroup:
    """One worker's cgroup: made before the worker starts (its first process moves itself in, so
    every later process is inside), its ``memory.max`` set per job, removed once it is empty."""

    def __init__(self, parent: Path) -> None:
        self.path = parent / f"agentrl-sandbox-{os.getpid()}-{next(_names)}"
        self.path.mkdir()
        self.procs = str(self.path / "cgroup.procs")
        self._write("memory.swap.max", "0")  # absent without swap accounting: then there is no swap to bound
        self._write("memory.oom.group", "0")  # the kernel kills the job's biggest process, not the supervisor
        self._seen_oom_kills = self.oom_kills()

    def _write(self, name: str, value: str) -> bool:
        try:
            (self.path / name).write_text(value)
            return True
        except OSError:
            return False

    def limit(self, memory_mb: int) -> None:
        self._write("memory.max", str((memory_mb + BASELINE_MB) << 20))

    def oom_kills(self) -> int:
        try:
            for line in (self.path / "memory.events").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def killed_for_memory(self) -> bool:
        """Whether the kernel killed a process of this sandbox for memory since the last call."""
        count = self.oom_kills()
        killed, self._seen_oom_kills = count > self._seen_oom_kills, count
        return killed

    def remove(self) -> None:
        """Remove the cgroup once its processes (dying with the sandbox) are gone."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return  # still busy: an empty directory is left behind, nothing runs in it
                time.sleep(0.02)
