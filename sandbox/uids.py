"""Host uids for sandboxes, leased system-wide.

Each live sandbox runs as its own unprivileged host uid, so RLIMIT_NPROC counts one sandbox's
processes and no sandbox can signal another's. A uid is leased by holding an exclusive ``flock`` on
a lock file named after it: the lock is per open file, so no two live sandboxes share a uid,
whether they belong to one backend, two backends of one process or two processes (a tool server
and a trainer); a crashed process's leases end with it, and a freed uid is the first one taken
again. Uids that name a user (``getpwuid``: /etc/passwd, or systemd's dynamic users where nss-systemd
answers) are skipped.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import stat
import tempfile
from pathlib import Path

from agentrl.sandbox.base import SandboxUnavailable

LOCKS = Path(tempfile.gettempdir()) / "agentrl-sandbox-uids"
SPAN = 100_000  # how far above the base a lease is looked for


class Lease:
    def __init__(self, uid: int, fd: int) -> None:
        self.uid, self._fd = uid, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the lock file ends the flock
            self._fd = None


def lock_directory(directory: Path) -> Path:
    """The lock directory, made private to this uid; refused if anyone else could plant locks."""
    directory.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise SandboxUnavailable(f"{directory} must be a directory of uid {os.geteuid()} that only it can write; "
                                 "remove it and it is made again")
    return directory


def lease_uid(base: int, directory: Path = LOCKS) -> Lease:
    """The lowest free uid from ``base`` up, leased until :meth:`Lease.release`."""
    directory = lock_directory(directory)
    for uid in range(base, base + SPAN):
        try:
            pwd.getpwuid(uid)
            continue  # a real (or dynamic) user's uid: not ours to use
        except KeyError:
            pass
        fd = os.open(directory / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return Lease(uid, fd)
    raise SandboxUnavailable(f"no free sandbox uid in {base}-{base + SPAN - 1}")
