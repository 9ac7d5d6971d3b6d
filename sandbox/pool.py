"""The warm pool shared by the sandbox backends: pre-started workers speaking the JSON-lines
protocol of :mod:`agentrl.sandbox.worker`, replaced whenever one dies or overruns."""

from __future__ import annotations

import base64
import json
import os
import queue
import select
import struct
import subprocess
import threading
import time
import warnings
import weakref
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor

from agentrl.sandbox.base import (
    DEFAULT_MAX_OUTPUT_BYTES,
    Backend,
    RunResult,
    SandboxUnavailable,
    Session,
)
from agentrl.sandbox.cgroup import SandboxCgroup
from agentrl.sandbox.uids import Lease, lease_uid
from agentrl.sandbox.worker import LANGUAGES

# Outputs are capped inside the sandbox; a reply also carries fetched files (16 MiB, as base64) and
# JSON escaping of the outputs. Anything longer is a worker gone wrong.
MAX_REPLY_BYTES = 64 << 20
CLEANUP_S = 3.0  # the worker's bound on one job's cleanup (worker.CLEANUP_S)

# bubblewrap's --die-with-parent is PR_SET_PDEATHSIG, which fires when the *thread* that started
# the process exits. Workers are therefore always started from this one long-lived thread, never
# from a short-lived thread such as asyncio.to_thread's.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentrl-sandbox-spawner")


class Worker:
    """One sandboxed interpreter speaking the worker's length-prefixed JSON protocol. Every read and
    write is bounded in time and size, so nothing inside the sandbox can hang or flood the host."""

    def __init__(self, command: list[str], uid: int | None, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = (), max_reply_bytes: int = MAX_REPLY_BYTES,
                 cgroup: SandboxCgroup | None = None, lease: Lease | None = None) -> None:
        self.uid = uid if uid is not None and os.geteuid() == 0 else None
        self.lease = lease
        self.cgroup = cgroup
        procs = cgroup.procs if cgroup is not None else None

        def into_cgroup_then_demote() -> None:  # the cgroup move needs the host's rights, so it comes first
            with open(procs, "w") as handle:
                handle.write("0")
            if self.uid is not None:
                os.setgroups([])
                os.setgid(self.uid)
                os.setuid(self.uid)

        self.max_reply_bytes = max_reply_bytes
        self.failure = ""
        # Without a cgroup the uid change is done by subprocess itself, in C: no Python code runs
        # between fork and exec in this threaded process. Processes are limited inside the sandbox
        # (RLIMIT_NPROC on every job, counted per sandbox uid).
        options = ({"preexec_fn": into_cgroup_then_demote} if procs is not None else
                   {"user": self.uid, "group": self.uid, "extra_groups": []} if self.uid is not None else {})
        self.process = _spawner.submit(
            subprocess.Popen, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, bufsize=0, env=env, pass_fds=pass_fds, **options,
        ).result()
        os.set_blocking(self.process.stdin.fileno(), False)
        self.lock = threading.Lock()
        ready = self._read_frame(time.monotonic() + 30.0)
        if ready is None or not ready.get("ready"):
            error = self._stderr_tail()
            self.kill()
            raise SandboxUnavailable(f"could not start a sandbox worker: {error or self.failure or 'no answer'}")

    def _stderr_tail(self) -> str:
        try:
            if self.process.poll() is not None:
                return self.process.stderr.read()[-500:].decode(errors="replace").strip()
        except (OSError, ValueError):
            pass
        return ""

    def _read_exactly(self, size: int, deadline: float) -> bytes | None:
        fd, chunks, missing = self.process.stdout.fileno(), [], size
        while missing:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                self.failure = f"no answer within {deadline - self._sent:.0f} s"
                return None
            chunk = os.read(fd, min(missing, 1 << 20))
            if not chunk:
                self.failure = "the worker exited"
                return None
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def _read_frame(self, deadline: float) -> dict | None:
        self._sent = time.monotonic()
        header = self._read_exactly(4, deadline)
        if header is None:
            return None
        (size,) = struct.unpack(">I", header)
        if size > self.max_reply_bytes:
            self.failure = f"a reply of {size} bytes, over the {self.max_reply_bytes}-byte limit"
            return None
        body = self._read_exactly(size, deadline)
        try:
            answer = None if body is None else json.loads(body)
        except ValueError:
            answer = None
            self.failure = "a malformed reply"
        return answer if isinstance(answer, dict) else None

    def _write_all(self, data: bytes, deadline: float) -> bool:
        fd, view = self.process.stdin.fileno(), memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
                self.failure = "the worker did not take the request in time"
                return False
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except OSError:
                self.failure = "the worker exited"
                return False
        return True

    def request(self, job: dict, timeout: float) -> dict | None:
        """Send a job; ``None`` if the worker died, overran or broke the protocol (then it is
        killed, and ``failure`` says which)."""
        with self.lock:
            deadline = time.monotonic() + timeout
            data = json.dumps(job).encode()
            answer = None
            if self._write_all(struct.pack(">I", len(data)) + data, deadline):
                answer = self._read_frame(deadline)
            if answer is None:
                self.kill()
            return answer

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> bool:
        """Kill the worker's process group; True once it is gone."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, 9)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            try:
                stream.close()
            except OSError:
                pass
        gone = self.process.poll() is not None
        if gone and self.cgroup is not None:
            self.cgroup.remove()
        if gone and self.lease is not None:  # the uid is free again only once nothing runs as it
            self.lease.release()
        return gone


class PooledBackend(Backend):
    """A backend whose executions go to a pool of warm workers. Subclasses say how to start one.

    When the host process is root, every worker (pooled or a session's) leases the lowest free uid
    from ``uid_base`` up (:mod:`agentrl.sandbox.uids`) and gives it back once its sandbox is gone, so
    no two live sandboxes share a uid, even across processes."""

    def __init__(self, pool_size: int = 2, max_processes: int = 32, tmpfs_mb: int = 64, uid_base: int | None = None,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, session_ttl_s: float = 600.0,
                 worker_wait_s: float = 120.0) -> None:
        self.pool_size = pool_size
        self.session_ttl_s = session_ttl_s
        self.worker_wait_s = worker_wait_s
        self._sessions: weakref.WeakSet[PooledSession] = weakref.WeakSet()
        self._reaper: threading.Thread | None = None
        self._stopped = threading.Event()
        self.max_processes = max_processes
        self.tmpfs_mb = tmpfs_mb
        self.uid_base = uid_base
        self.max_output_bytes = max_output_bytes
        self._idle: queue.Queue[Worker] = queue.Queue()
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(pool_size):
            self._slots.put(slot)
        self._closed = False
        if uid_base is not None and os.geteuid() != 0:
            warnings.warn(
                f"the sandbox host process is not root (uid {os.geteuid()}), so every sandbox runs as this same uid: "
                "they share one process limit and can signal each other's processes, and a fork bomb in one starves "
                "the rest; run the trainer or tool server as root for a separate uid per sandbox",
                RuntimeWarning, stacklevel=3)

    @abstractmethod
    def command(self, mode: str, memory_mb: int = 512) -> list[str]:
        """The command line that starts a worker in ``pool`` or ``session`` mode."""

    def environment(self) -> dict[str, str] | None:
        return None

    def languages(self) -> list[str]:
        """What ``run`` accepts as ``language``: Python, and the interpreters this host has."""
        return ["python", *(name for name, (path, _) in LANGUAGES.items() if os.access(path, os.X_OK))]

    def lease_uid(self) -> Lease | None:
        """A distinct unprivileged host uid for a new worker (process limits and signals stay apart)."""
        return lease_uid(self.uid_base) if self.uid_base is not None and os.geteuid() == 0 else None

    def start_worker(self, mode: str, slot: int | None, memory_mb: int = 512) -> Worker:
        lease = self.lease_uid()
        try:
            worker = Worker(self.command(mode, memory_mb), lease and lease.uid, self.environment(), lease=lease)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        worker.slot = slot
        return worker

    # -- pool ------------------------------------------------------------------------------

    def _replenish(self) -> None:
        while not self._closed:
            try:
                slot = self._slots.get_nowait()
            except queue.Empty:
                return
            try:
                worker = self.start_worker("pool", slot)
            except BaseException:
                self._slots.put(slot)
                raise
            self._idle.put(worker)

    def _take_worker(self) -> Worker:
        """An idle worker; slots whose worker failed to start are retried while waiting."""
        deadline = time.monotonic() + self.worker_wait_s
        error: BaseException | None = None
        while True:
            try:
                return self._idle.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                pass
            if self._closed:
                raise SandboxUnavailable("the sandbox backend is closed")
            try:
                self._replenish()
            except SandboxUnavailable as failure:
                error = failure
            if time.monotonic() > deadline:
                raise SandboxUnavailable(f"no sandbox worker became free within {self.worker_wait_s:g} s"
                                         + (f": {error}" if error else ""))

    def _retire(self, worker: Worker) -> None:
        """Replace a worker that died, overran or could not clean up after its job; the job that
        caused it pays for the restart, not the next one. After ``close`` it is only stopped."""
        worker.kill()
        if self._closed:
            return
        self._slots.put(worker.slot)
        try:
            self._replenish()
        except SandboxUnavailable:
            pass  # retried by the next call that waits for a worker

    def run(self, code: str, stdin: str = "", files: dict[str, bytes] | None = None, timeout: float = 10.0,
            memory_mb: int = 512, language: str = "python", fetch_files: list[str] | tuple[str, ...] = ()) -> RunResult:
        if self._closed:
            raise SandboxUnavailable("the sandbox backend is closed")
        language = "python" if language == "python3" else language
        if language not in self.languages():
            raise SandboxUnavailable(f"language {language!r} is not supported here; supported: {', '.join(self.languages())}")
        worker = self._take_worker()
        job = {
            "code": code, "stdin": stdin, "timeout": timeout, "memory_mb": memory_mb, "language": language,
            "files": {name: base64.b64encode(data).decode() for name, data in (files or {}).items()},
            "fetch_files": list(fetch_files), "max_output_bytes": self.max_output_bytes,
            "processes": self.max_processes, "file_bytes": self.tmpfs_mb * 1024 * 1024,
        }
        started = time.monotonic()
        if worker.cgroup is not None:
            worker.cgroup.limit(memory_mb)
        answer = worker.request(job, timeout + CLEANUP_S + 5.0)
        if answer is not None and worker.cgroup is not None and worker.cgroup.killed_for_memory():
            answer["memory_exceeded"] = True
        if answer is not None and worker.alive and not answer.get("replace_worker") and not self._closed:
            self._idle.put(worker)
        else:
            self._retire(worker)
        if answer is None:
            overran = time.monotonic() - started >= timeout
            return RunResult(timed_out=overran, return_code=None, duration_s=time.monotonic() - started,
                             sandbox_error=None if overran else f"the worker failed: {worker.failure}")
        return RunResult(**{k: answer.get(k) for k in RunResult.__dataclass_fields__ if k in answer})

    def session(self, memory_mb: int = 512) -> PooledSession:
        session = PooledSession(self, memory_mb)
        self._sessions.add(session)
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap_idle_sessions, name="agentrl-sandbox-reaper", daemon=True)
            self._reaper.start()
        return session

    def _reap_idle_sessions(self) -> None:
        """Stop the sandbox of every session idle for longer than ``session_ttl_s``: a trajectory
        that never closes its tool must not hold a sandbox forever."""
        while not self._stopped.wait(min(1.0, self.session_ttl_s / 4)):
            for session in list(self._sessions):
                session.expire_if_idle(self.session_ttl_s)

    def close(self) -> None:
        self._closed = True
        self._stopped.set()
        for session in list(self._sessions):
            session.close()
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return


class PooledSession(Session):
    """A persistent interpreter in its own sandbox (own uid, namespaces and tmpfs)."""

    def __init__(self, backend: PooledBackend, memory_mb: int = 512) -> None:
        self.backend = backend
        self.memory_mb = memory_mb
        self.worker: Worker | None = None
        self.last_used = time.monotonic()
        self.expired = False
        self._lock = threading.Lock()

    def run(self, code: str, timeout: float = 10.0) -> RunResult:
        with self._lock:
            notice = ""
            if self.expired:
                notice = f"[the session was idle for over {self.backend.session_ttl_s:g} s and restarted; earlier variables are lost]\n"
                self.expired = False
            if self.worker is None or not self.worker.alive:
                self._stop()
                self.worker = self.backend.start_worker("session", None, self.memory_mb)
                if self.worker.cgroup is not None:
                    self.worker.cgroup.limit(self.memory_mb)
            started = time.monotonic()
            job = {"code": code, "timeout": timeout, "max_output_bytes": self.backend.max_output_bytes}
            answer = self.worker.request(job, timeout + 5.0)
            self.last_used = time.monotonic()
            if answer is None:  # overran or crashed: the session's state is gone with its sandbox
                failure = self.worker.failure
                self._stop()
                return RunResult(timed_out=True, return_code=None, duration_s=time.monotonic() - started,
                                 stderr=f"the session was restarted ({failure}); earlier variables are lost")
            if answer.get("timed_out") or answer.get("memory_exceeded"):
                self._stop()  # a process that hit a limit may be inconsistent: start clean next time
            result = RunResult(**{k: answer.get(k) for k in RunResult.__dataclass_fields__ if k in answer})
            result.stdout = notice + result.stdout
            return result

    def expire_if_idle(self, ttl_s: float) -> None:
        """Stop the sandbox if unused for ``ttl_s``; the next ``run`` starts fresh and says so."""
        if not self._lock.acquire(blocking=False):
            return  # running right now: not idle
        try:
            if self.worker is not None and time.monotonic() - self.last_used > ttl_s:
                self._stop()
                self.expired = True
        finally:
            self._lock.release()

    def _stop(self) -> None:
        if self.worker is not None:
            self.worker.kill()
            self.worker = None

    def close(self) -> None:
        with self._lock:
            self._stop()
