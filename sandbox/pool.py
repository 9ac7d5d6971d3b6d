"""The warm pool shared by the sandbox backends: pre-started workers speaking the JSON-lines
protocol of :mod:`agentrl.sandbox.worker`, replaced whenever one dies or overruns."""

from __future__ import annotations

import base64
import itertools
import json
import os
import queue
import select
import subprocess
import threading
import time
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

_session_ids = itertools.count()

# bubblewrap's --die-with-parent is PR_SET_PDEATHSIG, which fires when the *thread* that started
# the process exits. Workers are therefore always started from this one long-lived thread, never
# from a short-lived thread such as asyncio.to_thread's.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentrl-sandbox-spawner")


class Worker:
    """One sandboxed interpreter speaking the worker's JSON-lines protocol."""

    def __init__(self, command: list[str], uid: int | None, processes: int, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        def demote() -> None:
            import resource

            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))

        preexec = demote if uid is not None and os.geteuid() == 0 else None
        self.process = _spawner.submit(
            subprocess.Popen, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=preexec, start_new_session=True, text=True, bufsize=1, env=env, pass_fds=pass_fds,
        ).result()
        self.lock = threading.Lock()
        ready = self._read_line(30.0)
        if ready is None or not ready.get("ready"):
            error = self._stderr_tail()
            self.kill()
            raise SandboxUnavailable(f"could not start a sandbox worker: {error or 'no answer'}")

    def _stderr_tail(self) -> str:
        try:
            if self.process.poll() is not None:
                return self.process.stderr.read()[-500:].strip()
        except (OSError, ValueError):
            pass
        return ""

    def _read_line(self, timeout: float) -> dict | None:
        # One reply per request, so nothing is ever left buffered between calls: select is exact.
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.process.stdout.readline()
        return json.loads(line) if line else None

    def request(self, job: dict, timeout: float) -> dict | None:
        """Send a job; ``None`` if the worker died or did not answer in time (then it is killed)."""
        with self.lock:
            try:
                self.process.stdin.write(json.dumps(job) + "\n")
                self.process.stdin.flush()
            except (BrokenPipeError, OSError):
                self.kill()
                return None
            answer = self._read_line(timeout)
            if answer is None:
                self.kill()
            return answer

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
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


class PooledBackend(Backend):
    """A backend whose executions go to a pool of warm workers. Subclasses say how to start one."""

    def __init__(self, pool_size: int = 2, max_processes: int = 32, tmpfs_mb: int = 64, uid_base: int | None = None,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, session_ttl_s: float = 600.0) -> None:
        self.pool_size = pool_size
        self.session_ttl_s = session_ttl_s
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

    @abstractmethod
    def command(self, mode: str, memory_mb: int = 512) -> list[str]:
        """The command line that starts a worker in ``pool`` or ``session`` mode."""

    def environment(self) -> dict[str, str] | None:
        return None

    def uid(self, slot: int) -> int | None:
        """A distinct unprivileged host uid per worker (process limits and signals stay apart)."""
        return None if self.uid_base is None else self.uid_base + slot

    def start_worker(self, mode: str, slot: int, memory_mb: int = 512) -> Worker:
        worker = Worker(self.command(mode, memory_mb), self.uid(slot), self.max_processes, self.environment())
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

    def run(self, code: str, stdin: str = "", files: dict[str, bytes] | None = None, timeout: float = 10.0,
            memory_mb: int = 512) -> RunResult:
        if self._closed:
            raise SandboxUnavailable("the sandbox backend is closed")
        worker = self._idle.get()
        job = {
            "code": code, "stdin": stdin, "timeout": timeout, "memory_mb": memory_mb,
            "files": {name: base64.b64encode(data).decode() for name, data in (files or {}).items()},
            "max_output_bytes": self.max_output_bytes, "processes": self.max_processes,
            "file_bytes": self.tmpfs_mb * 1024 * 1024,
        }
        started = time.monotonic()
        answer = worker.request(job, timeout + 5.0)
        if answer is not None and worker.alive and not answer.get("sandbox_error"):
            self._idle.put(worker)
        else:
            worker.kill()
            self._slots.put(worker.slot)
            self._replenish()
        if answer is None:
            return RunResult(timed_out=True, return_code=None, duration_s=time.monotonic() - started,
                             sandbox_error=None if time.monotonic() - started >= timeout else "the worker died")
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
        self.slot = backend.pool_size + 1 + next(_session_ids) % 1000
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
                self.worker = self.backend.start_worker("session", self.slot, self.memory_mb)
            started = time.monotonic()
            job = {"code": code, "timeout": timeout, "max_output_bytes": self.backend.max_output_bytes}
            answer = self.worker.request(job, timeout + 2.0)
            self.last_used = time.monotonic()
            if answer is None:  # overran or crashed: the session's state is gone with its sandbox
                self._stop()
                return RunResult(timed_out=True, duration_s=time.monotonic() - started,
                                 stderr="the session was restarted; earlier variables are lost")
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
