"""Cleanup inside a sandbox between jobs: kill what a job left running, remove its IPC objects,
empty its directories, all within a deadline. Standard library only; used by :mod:`worker` and
:mod:`worker_session`.
"""

import ctypes
import os
import signal
import stat
import time

ROOT = os.environ.get("AGENTRL_SANDBOX_ROOT", "/tmp")
WORK = os.path.join(ROOT, "work")
LIBC = ctypes.CDLL(None, use_errno=True)


def kill_everything_else(deadline, spare=(1,)):
    """Kill and reap every process of this pid namespace except ``spare`` and this one (init, to
    which orphans come, so it reaps them all). True when none is left."""
    me = os.getpid()
    while True:
        others = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (*spare, me)]
        if not others:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.002)
                break


def remove_ipc_objects():
    """Remove the System V shared memory, semaphores and message queues a job created: they live
    in the sandbox's IPC namespace, not in a process, and would otherwise reach the next job."""
    ipc_rmid = 0
    for kind, remove in (("shm", lambda i: LIBC.shmctl(i, ipc_rmid, None)),
                         ("sem", lambda i: LIBC.semctl(i, 0, ipc_rmid)),
                         ("msg", lambda i: LIBC.msgctl(i, ipc_rmid, None))):
        try:
            with open(f"/proc/sysvipc/{kind}") as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            remove(int(row.split()[1]))


def _remove_files_here(deadline):
    """Unlink everything in the current directory but subdirectories; return those."""
    subdirectories = []
    with os.scandir(".") as entries:
        for count, entry in enumerate(entries):
            if count % 1024 == 0 and time.monotonic() > deadline:
                raise TimeoutError
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(entry.name)
            else:
                os.unlink(entry.name)
    return subdirectories


def _unlock(path):
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        os.chmod(path, 0o700)  # a job locked it (chmod 000); it belongs to our uid


def wipe(directory, deadline):
    """Empty ``directory`` without recursion and by relative names, so a tree thousands of levels
    deep neither raises RecursionError nor exceeds PATH_MAX. The job's processes are dead by now,
    so nothing changes underneath. False if the deadline passed first."""
    _unlock(directory)
    os.chdir(directory)
    try:
        levels = []  # for each level below ``directory``: (its name, its parent's subdirectories still to empty)
        pending = _remove_files_here(deadline)
        while pending or levels:
            if time.monotonic() > deadline:
                return False
            if pending:
                name = pending.pop()
                _unlock(name)
                os.chdir(name)
                levels.append((name, pending))
                pending = _remove_files_here(deadline)
            else:
                name, pending = levels.pop()
                os.chdir("..")
                os.rmdir(name)
        return True
    except TimeoutError:
        return False
    finally:
        os.chdir("/")


def workdir_is_clean(root_mode):
    try:
        work = os.lstat(WORK)
        return (os.listdir(ROOT) == ["work"] and stat.S_ISDIR(work.st_mode) and stat.S_IMODE(work.st_mode) == 0o755
                and not os.listdir(WORK) and stat.S_IMODE(os.stat(ROOT).st_mode) == root_mode)
    except OSError:
        return False
