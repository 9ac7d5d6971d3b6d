"""The bubblewrap backend: untrusted code in fresh namespaces, from a warm pool of sandboxes.

Each worker is ``bwrap`` started as its own unprivileged host uid (so RLIMIT_NPROC caps a fork bomb
per worker, and no worker can signal another's processes) with new user, pid, net, ipc, uts and
cgroup namespaces (the only interface is ``lo``), nested user namespaces disabled, no capabilities,
``--die-with-parent``, a fresh session, a cleared environment, a seccomp filter (see ``_DENIED``),
read-only binds of the interpreter and the Python packages it may import (nothing of the project,
nothing under ``/root``), a read-only root and ``/dev``, and two size-limited tmpfs as the only
writable places (``/tmp``, the work area, and ``/dev/shm``). The worker's own modules are copied
into the sandbox's root (``--file``), not bound, so ``/proc/self/mountinfo`` does not show where
the project lives; each bound directory's host path does show there (the kernel lists a bind
mount's source, and bubblewrap cannot hide it: see SECURITY.md).

Inside, :mod:`agentrl.sandbox.worker` runs as the namespace's pid 1, a non-dumpable supervisor
that jobs can neither signal, trace nor read. A zygote it forked before any job forks each job, so
no job starts from memory that held another's data; jobs get rlimits (CPU seconds, address space,
processes, file size, open files, no POSIX message queues); after each job the supervisor kills
every other process of the namespace, removes System V IPC objects and empties both tmpfs within
a time bound, so nothing of one trajectory's execution reaches the next.

Memory: where a cgroup v2 is delegated (:mod:`agentrl.sandbox.cgroup`), each sandbox has its own
cgroup and ``memory_mb`` bounds the sum over its processes. Otherwise it is bounded per process
(RLIMIT_AS): a job may hold up to ``max_processes`` times ``memory_mb``; keep ``max_processes``
modest on small machines, and let the sandbox server's memory budget bound what it grants.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

from agentrl.sandbox.base import DEFAULT_MAX_OUTPUT_BYTES, SandboxUnavailable
from agentrl.sandbox.cgroup import SandboxCgroup, delegated_cgroup
from agentrl.sandbox.pool import PooledBackend, Worker

WORKER = Path(__file__).with_name("worker.py")
WORKER_MODULES = [WORKER.with_name(name) for name in ("worker_session.py", "worker_cleanup.py")]
SANDBOX_SITE = "/opt/site"
SHM_MB = 16  # /dev/shm, for multiprocessing's semaphores
SYSTEM_BINDS = ("/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", "/etc/alternatives", "/etc/localtime")


# Denied with EPERM. ptrace, process_vm_readv/writev: reach the zygote. add_key, request_key,
# keyctl: the kernel keyrings are per host uid and would outlive the job. io_uring, bpf,
# userfaultfd, perf_event_open, modify_ldt, uselib, kexec: the usual kernel privilege-escalation
# surface, none of which a program under test needs. The mount and namespace family (mount,
# umount2, pivot_root, unshare, setns, the new mount API, the file-handle calls): the sandbox's
# namespaces are made once, by bwrap, before the filter is loaded; statmount and listmount (the
# syscall form of /proc/self/mountinfo) with them.
_DENIED = {
    "x86_64": {"ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "add_key": 248, "request_key": 249,
               "keyctl": 250, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 321,
               "userfaultfd": 323, "perf_event_open": 298, "modify_ldt": 154, "uselib": 134, "kexec_load": 246,
               "kexec_file_load": 320, "mount": 165, "umount2": 166, "pivot_root": 155, "unshare": 272, "setns": 308,
               "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
               "mount_setattr": 442, "name_to_handle_at": 303, "open_by_handle_at": 304, "statmount": 457,
               "listmount": 458},
    "aarch64": {"ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "add_key": 217, "request_key": 218,
                "keyctl": 219, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 280,
                "userfaultfd": 282, "perf_event_open": 241, "kexec_load": 104, "kexec_file_load": 294, "mount": 40,
                "umount2": 39, "pivot_root": 41, "unshare": 97, "setns": 268, "open_tree": 428, "move_mount": 429,
                "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
                "name_to_handle_at": 264, "open_by_handle_at": 265, "statmount": 457, "listmount": 458},
}
# (audit architecture, clone, clone3). clone's flags (its first argument on both) are checked for
# namespace flags; clone3 passes them in memory, out of a filter's reach, so it answers ENOSYS and
# glibc falls back to clone.
_ARCH = {"x86_64": (0xC000003E, 56, 435), "aarch64": (0xC00000B7, 220, 435)}
# CLONE_NEWTIME | CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
# CLONE_NEWPID | CLONE_NEWNET
CLONE_NAMESPACE_FLAGS = 0x00000080 | 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000


def seccomp_program() -> bytes:
    """A classic-BPF seccomp filter: kill on a foreign architecture, EPERM for the syscalls above,
    for x32 syscall numbers and for clone with a namespace flag, ENOSYS for clone3, allow the rest."""
    machine = platform.machine()
    if machine not in _ARCH:
        raise SandboxUnavailable(f"no seccomp filter for {machine}; the bwrap backend supports x86_64 and aarch64")
    arch, clone, clone3 = _ARCH[machine]
    denied = sorted(_DENIED[machine].values())
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill, eperm, enosys = 0x7FFF0000, 0x80000000, 0x00050001, 0x00050026

    # Instructions with symbolic jump targets, resolved to relative offsets below.
    program: list[tuple[int, int, str | None, str | None]] = [
        (load, 4, None, None), (jeq, arch, None, "kill"), (load, 0, None, None),
        (jge, 0x40000000, "eperm", None), (jeq, clone, "clone", None), (jeq, clone3, "enosys", None),
        *[(jeq, number, "eperm", None) for number in denied],
        (ret, allow, None, None),
        ("clone", 0, None, None), (load, 16, None, None), (jset, CLONE_NAMESPACE_FLAGS, "eperm", None), (ret, allow, None, None),
        ("eperm", 0, None, None), (ret, eperm, None, None),
        ("enosys", 0, None, None), (ret, enosys, None, None),
        ("kill", 0, None, None), (ret, kill, None, None),
    ]
    labels, instructions = {}, []
    for code, k, jt, jf in program:
        if isinstance(code, str):
            labels[code] = len(instructions)
        else:
            instructions.append((code, k, jt, jf))

    def offset(position: int, target: str | None) -> int:
        return 0 if target is None else labels[target] - position - 1

    return b"".join(struct.pack("<HBBI", code, offset(i, jt), offset(i, jf), k)
                    for i, (code, k, jt, jf) in enumerate(instructions))


def _world_readable(path: Path) -> bool:
    """Can an unprivileged uid reach this path (every parent searchable, the file readable)?"""
    try:
        path = path.resolve()
        for parent in reversed(path.parents):
            if not parent.stat().st_mode & stat.S_IXOTH:
                return False
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def find_interpreter() -> Path:
    """A Python of the host's major.minor version that an unprivileged uid can execute, so the
    host's compiled packages (numpy) import inside the sandbox."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(sys.executable).resolve(), Path(f"/usr/bin/python{version}"), Path(f"/usr/local/bin/python{version}")]
    for candidate in candidates:
        try:
            if candidate.is_file() and _world_readable(candidate):
                return candidate.resolve()
        except OSError:  # e.g. a virtual environment's interpreter under /root, seen by another user
            continue
    raise SandboxUnavailable(
        f"no Python {version} that an unprivileged user can run (tried {', '.join(map(str, candidates))}); "
        f"install one, e.g. apt-get install python{version}"
    )


def site_packages(interpreter: Path) -> list[str]:
    """The interpreter's installed-package directories (masked inside: only the listed packages
    are bound, at ``/opt/site``)."""
    try:
        output = subprocess.run([str(interpreter), "-I", "-S", "-c", "import site, sys; print(*site.getsitepackages(), "
                                 "sep=chr(10))"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise SandboxUnavailable(f"cannot ask {interpreter} where its packages are: {error}") from None
    return [line for line in output.splitlines() if line.startswith("/")]


def package_binds(packages: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(host path, sandbox path) of each importable package, plus numpy-style ``<pkg>.libs`` dirs."""
    binds = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        location = Path(next(iter(spec.submodule_search_locations)))
        binds.append((location, f"{SANDBOX_SITE}/{location.name}"))
        libs = location.with_name(f"{location.name}.libs")
        if libs.is_dir():
            binds.append((libs, f"{SANDBOX_SITE}/{libs.name}"))
    return binds


class BwrapBackend(PooledBackend):
    """Options: ``pool_size`` (warm zygotes), ``packages`` importable inside (numpy by default),
    ``tmpfs_mb`` (the writable work area), ``max_processes`` per sandbox, ``uid_base``,
    ``session_ttl_s`` (idle sessions are stopped after it), ``cgroup`` (a delegated cgroup-v2
    directory for per-sandbox memory limits; found by itself where this process's own is delegated)."""

    name = "bwrap"

    def __init__(self, pool_size: int = 2, packages: tuple[str, ...] = ("numpy",), tmpfs_mb: int = 64,
                 max_processes: int = 32, uid_base: int = 61000, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
                 preload: tuple[str, ...] = ("numpy",), session_ttl_s: float = 600.0, cgroup: str | None = None) -> None:
        super().__init__(pool_size, max_processes, tmpfs_mb, uid_base, max_output_bytes, session_ttl_s)
        self.cgroup_parent = delegated_cgroup(cgroup)
        self.bwrap = shutil.which("bwrap")
        if self.bwrap is None:
            raise SandboxUnavailable("the bwrap backend needs bubblewrap: apt-get install bubblewrap")
        self.interpreter = find_interpreter()
        self._site_packages = [path for path in site_packages(self.interpreter) if os.path.isdir(path)]
        self._seccomp = seccomp_program()
        self.packages = tuple(packages)
        self.preload = tuple(p for p in preload if p in self.packages)
        unreachable = [str(host) for host, _ in package_binds(self.packages) if not _world_readable(host)]
        if unreachable:  # bwrap runs as an unprivileged uid and would fail on each of these
            raise SandboxUnavailable(
                f"the sandbox's unprivileged uid cannot reach {', '.join(unreachable)}: every parent directory must be "
                "searchable by others (chmod o+x), so keep the checkout and its virtual environment out of a private "
                "directory such as /root or one made by mktemp -d")
        self._replenish()

    # -- command ---------------------------------------------------------------------------

    def start_worker(self, mode: str, slot: int | None, memory_mb: int = 512) -> Worker:
        read_end, write_end = os.pipe()
        os.write(write_end, self._seccomp)
        os.close(write_end)
        modules = [os.open(path, os.O_RDONLY | os.O_CLOEXEC) for path in (WORKER, *WORKER_MODULES)]  # bwrap copies them
        cgroup = SandboxCgroup(self.cgroup_parent) if self.cgroup_parent is not None else None
        lease = None
        try:
            lease = self.lease_uid()
            command = self.command(mode, memory_mb, seccomp_fd=read_end, module_fds=modules)
            worker = Worker(command, lease and lease.uid, self.environment(), pass_fds=(read_end, *modules),
                            cgroup=cgroup, lease=lease)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            if lease is not None:
                lease.release()
            raise
        finally:
            for descriptor in (read_end, *modules):
                os.close(descriptor)
        worker.slot = slot
        return worker

    def command(self, mode: str, memory_mb: int = 512, seccomp_fd: int | None = None,
                module_fds: list[int] | None = None) -> list[str]:
        """The bwrap command line. ``module_fds``: open descriptors of the worker and its modules
        (in ``WORKER, *WORKER_MODULES`` order), copied into the sandbox; without them they are bound."""
        interpreter_root = self.interpreter.parents[1]  # e.g. /usr for /usr/bin/python3.11
        command = [
            self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--clearenv", "--hostname", "sandbox", "--uid", "1000", "--gid", "1000",
            "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(SHM_MB * 1024 * 1024), "--tmpfs", "/dev/shm",
            "--size", str(self.tmpfs_mb * 1024 * 1024), "--tmpfs", "/tmp",
        ]
        command.append("--as-pid-1")  # the worker is init: user code cannot signal it, orphans come to it
        for path in SYSTEM_BINDS:
            if os.path.exists(path):
                command += ["--ro-bind", path, path]
        if not str(self.interpreter).startswith(("/usr/", "/bin/", "/lib")):
            command += ["--ro-bind", str(interpreter_root), str(interpreter_root)]
        for path in self._site_packages:  # whatever is installed there, package data included, is hidden
            command += ["--size", "4096", "--tmpfs", path, "--remount-ro", path]
        for host, inside in package_binds(self.packages):
            command += ["--ro-bind", str(host), inside]
        for index, module in enumerate((WORKER, *WORKER_MODULES)):
            if module_fds is not None:  # a copy in the root tmpfs: no mount, so no host path in mountinfo
                command += ["--perms", "0444", "--file", str(module_fds[index]), f"/opt/agentrl/{module.name}"]
            else:
                command += ["--ro-bind", str(module), f"/opt/agentrl/{module.name}"]
        command += ["--remount-ro", "/"]
        environment = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONPATH": SANDBOX_SITE,
                       "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                       "AGENTRL_SANDBOX_ROOT": "/tmp", "AGENTRL_OWN_NAMESPACES": "1"}
        for key, value in environment.items():
            command += ["--setenv", key, value]
        if seccomp_fd is not None:
            command += ["--seccomp", str(seccomp_fd)]
        command += ["--chdir", "/tmp", str(self.interpreter), "-s", "-S", "/opt/agentrl/worker.py", mode, str(memory_mb)]
        if mode == "pool":
            command += list(self.preload)
        return command

