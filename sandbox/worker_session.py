"""A session's sandbox: one trajectory's persistent interpreter. The worker (the sandbox's init)
keeps the host protocol and forks an interpreter child without it; the child runs each call in a
long-lived namespace and reports on a private channel that the worker reads with a deadline and a
size cap, so user code can neither forge a reply to the host nor hang it. Standard library only.
"""

import os
import signal
import sys
import time

from worker import (
    CLEANUP_S,
    OWN_NAMESPACES,
    ROOT,
    WORK,
    read_frame,
    remember_source,
    set_limits,
    short_traceback,
    text,
    write_frame,
)
from worker_cleanup import kill_everything_else

CONTROL_FRAME_BYTES = 4096  # the interpreter's report: a few numbers


# -- sessions ------------------------------------------------------------------------------------

class Timeout(Exception):
    pass


def session_call(job, namespace):
    """Run one call in the interpreter's namespace, stdout and stderr to files the worker reads."""
    paths = (os.path.join(ROOT, ".stdout"), os.path.join(ROOT, ".stderr"))
    for fd, path in zip((1, 2), paths):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)

    def on_alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(job.get("timeout", 10)))
    timed_out, return_code = False, 0
    try:
        remember_source(job["code"])
        exec(compile(job["code"], "main.py", "exec"), namespace)
    except Timeout:
        timed_out, return_code = True, 1
    except SystemExit as exit_:
        return_code = exit_.code if isinstance(exit_.code, int) else 0
    except BaseException as error:
        sys.stderr.write(short_traceback(error))
        return_code = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:
            pass
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    return {"return_code": return_code, "timed_out": timed_out}


def interpreter(jobs_r, reports_w, memory_mb):
    """The session's long-lived child: it never holds the host protocol."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    os.chdir(WORK)
    set_limits(memory_mb, 10**6, 32 << 20, 32)  # time is enforced per call, by the worker and the host
    while True:
        job = read_frame(jobs_r)
        if job is None:
            os._exit(0)
        write_frame(reports_w, session_call(job, namespace))


class Interpreter:
    def __init__(self, memory_mb, protocol_fds):
        jobs_r, self.jobs_w = os.pipe()
        self.reports_r, reports_w = os.pipe()
        sys.stdout.flush()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                for fd in (*protocol_fds, self.jobs_w, self.reports_r, null):
                    os.close(fd)
                interpreter(jobs_r, reports_w, memory_mb)
            finally:
                os._exit(70)
        os.close(jobs_r)
        os.close(reports_w)

    def call(self, job, limit):
        started = time.monotonic()
        write_frame(self.jobs_w, {"code": job["code"], "timeout": job.get("timeout", 10)})
        report = read_frame(self.reports_r, started + float(job.get("timeout", 10)) + 1.0, CONTROL_FRAME_BYTES)
        if not isinstance(report, dict) or not isinstance(report.get("return_code"), int):
            timed_out = time.monotonic() - started >= float(job.get("timeout", 10))
            self.stop()
            return {"stdout": "", "return_code": None if not timed_out else 1, "timed_out": timed_out,
                    "duration_s": time.monotonic() - started, "restarted": True,
                    "stderr": "" if timed_out else "the session's interpreter stopped answering or wrote on its control "
                                                   "channel; it was restarted and earlier variables are lost"}
        outputs = []
        for name in (".stdout", ".stderr"):
            try:
                with open(os.path.join(ROOT, name), "rb") as handle:
                    data = handle.read(limit + 1)
                    size = os.fstat(handle.fileno()).st_size
            except OSError:
                data, size = b"", 0
            outputs.append(text(data[:limit], max(size - limit, 0)))
        return {"stdout": outputs[0], "stderr": outputs[1], "return_code": report["return_code"],
                "timed_out": bool(report.get("timed_out")), "memory_exceeded": "MemoryError" in outputs[1][-2000:],
                "duration_s": time.monotonic() - started}

    def stop(self):
        for fd in (self.jobs_w, self.reports_r):
            os.close(fd)
        if OWN_NAMESPACES:
            kill_everything_else(time.monotonic() + CLEANUP_S)
        else:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def serve_session(request_fd, reply_fd, memory_mb):
    write_frame(reply_fd, {"ready": True})
    current = None
    while True:
        job = read_frame(request_fd)
        if job is None:
            return
        if current is None:
            current = Interpreter(memory_mb, (request_fd, reply_fd))
        result = current.call(job, int(job.get("max_output_bytes", 65536)))
        if result.pop("restarted", False):
            current = None
        while True:  # reap the interpreter's exited orphans (they come to this init)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        write_frame(reply_fd, result)


def main():
    global ROOT_MODE
