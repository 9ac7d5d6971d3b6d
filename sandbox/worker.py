"""The process that lives inside a sandbox. Standard library only; talks length-prefixed JSON frames
(a 4-byte big-endian length, then the JSON) on stdin/stdout.

``pool`` mode (a zygote): heavy modules are imported once. The zygote never reads a job: when a
request is waiting it forks a supervisor, and that supervisor reads the request from the pipe,
forks the user's process, collects its output, cleans up after it (kills every other process of
the sandbox, removes IPC objects, empties ``/tmp`` and ``/dev/shm``, all within a time bound),
writes the reply and exits. So no process that holds one job's data (code, stdin, output, files)
is ever the parent of the next job: the next job starts from the zygote's memory, which has never
seen any job. A cleanup that overruns or fails is reported, and the host replaces the worker.

``session`` mode: one trajectory's persistent interpreter. The worker keeps the host protocol and
forks an interpreter child without it; the child runs each call in a long-lived namespace and
reports on a private channel that the worker reads with a deadline and a size cap, so user code
can neither forge a reply to the host nor hang it.
"""

import base64
import json
import linecache
import os
import resource
import select
import signal
import stat
import struct
import sys
import time
import traceback

# Inside bubblewrap the root is the sandbox's private tmpfs; the process backend gives a private
# temporary directory. Only this root is ever wiped.
ROOT = os.environ.get("AGENTRL_SANDBOX_ROOT", "/tmp")
WORK = os.path.join(ROOT, "work")
# Under bubblewrap the worker owns its pid and IPC namespaces and /dev/shm, so it may clean them.
OWN_NAMESPACES = os.environ.get("AGENTRL_OWN_NAMESPACES") == "1"
SHM = "/dev/shm"
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36
MARK = "\n[... output truncated: {} more bytes ...]\n"
CLEANUP_S = 3.0  # the most a job's cleanup may take before the worker is replaced instead
MAX_FETCH_BYTES = 16 << 20  # files returned by fetch_files, all together
CONTROL_FRAME_BYTES = 4096  # a session interpreter's report: a few numbers
LANGUAGES = {  # language -> (interpreter, file suffix) for what is not run in-process
    "bash": ("/bin/bash", ".sh"), "sh": ("/bin/sh", ".sh"), "nodejs": ("/usr/bin/node", ".js"),
    "perl": ("/usr/bin/perl", ".pl"),
}
_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


# -- framing -------------------------------------------------------------------------------------

def write_frame(fd, message):
    data = json.dumps(message).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_exactly(fd, size, deadline=None):
    chunks, missing = [], size
    while missing:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
        chunk = os.read(fd, min(missing, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def read_frame(fd, deadline=None, limit=None):
    """One frame, or ``None`` at end of stream, past the deadline, over ``limit`` or malformed."""
    header = read_exactly(fd, 4, deadline)
    if header is None:
        return None
    (size,) = struct.unpack(">I", header)
    if limit is not None and size > limit:
        return None
    body = read_exactly(fd, size, deadline)
    try:
        return None if body is None else json.loads(body)
    except ValueError:
        return None


# -- running user code ---------------------------------------------------------------------------

def set_limits(memory_mb, cpu_seconds, file_bytes, processes, open_files=256):
    limits = [
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_FSIZE, file_bytes),
        (resource.RLIMIT_NOFILE, open_files),
        (resource.RLIMIT_NPROC, processes),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_MSGQUEUE, 0),  # POSIX message queues would outlive the job in its IPC namespace
    ]
    if memory_mb:
        limits.append((resource.RLIMIT_AS, memory_mb * 1024 * 1024))
    for kind, value in limits:
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass


def short_traceback(error):
    """The user's frames only (the code is 'main.py'), and the exception line."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == "main.py"][-3:]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(type(error), error)
    return "".join(lines)


def remember_source(code):
    """Let tracebacks quote the user's lines."""
    linecache.cache["main.py"] = (len(code), None, code.splitlines(True), "main.py")


def run_user_code(code):
    """Execute ``code`` as __main__; return the exit code."""
    remember_source(code)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    sys.argv = ["main.py"]
    try:
        exec(compile(code, "main.py", "exec"), namespace)
        return 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException as error:  # the user's error goes to stderr, as Python would print it
        sys.stderr.write(short_traceback(error))
        return 1


def read_capped(fds, deadline, limit, pid):
    """Read pipes until EOF or the deadline; keep ``limit`` bytes of each, count the rest.

    Returns ``(kept, dropped, timed_out, status)``. Once the job's own process has exited, a
    background child still holding the pipes open does not keep the job waiting: what is already
    written is drained and the leftover is killed by the caller.
    """
    kept = {fd: bytearray() for fd in fds}
    dropped = {fd: 0 for fd in fds}
    open_fds = list(fds)
    status = None
    while open_fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return kept, dropped, True, status
        if status is None:
            finished, status_value = os.waitpid(pid, os.WNOHANG)
            status = status_value if finished else None
        ready, _, _ = select.select(open_fds, [], [], min(remaining, 0.05 if status is not None else 0.5))
        if not ready and status is not None:
            break  # the job exited and nothing more is coming right now
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
                continue
            room = limit - len(kept[fd])
            kept[fd] += chunk[:max(room, 0)]
            dropped[fd] += max(len(chunk) - max(room, 0), 0)
    return kept, dropped, False, status


def text(data, dropped):
    out = data.decode("utf-8", "replace")
    return out + MARK.format(dropped) if dropped else out


def write_files(files):
    for name, content in (files or {}).items():
        target = os.path.normpath(os.path.join(WORK, name))
        if not target.startswith(WORK + "/"):
            raise ValueError(f"file name {name!r} leaves the work directory")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as handle:
            handle.write(base64.b64decode(content))


def fetch_files(names, limit=MAX_FETCH_BYTES):
    """``(files, missing)``: the requested work-directory files as base64, within ``limit`` bytes
    in all, and for each one not returned the reason."""
    files, missing, total = {}, {}, 0
    for name in names:
        target = os.path.normpath(os.path.join(WORK, name))
        if not target.startswith(WORK + "/"):
            missing[name] = "the name leaves the work directory"
            continue
        try:
            with open(target, "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    missing[name] = "not a regular file"
                    continue
                data = handle.read(limit - total + 1)
        except OSError as error:
            missing[name] = error.strerror or str(error)
            continue
        if total + len(data) > limit:
            missing[name] = f"over the {limit >> 20} MiB limit on fetched files"
            continue
        total += len(data)
        files[name] = base64.b64encode(data).decode()
    return files, missing


def job_child(job, stdin_fd, out_w, err_w, timeout):
    """The user's process: fresh descriptors 0-2, nothing else open, rlimits, then the code."""
    try:
        os.setsid()
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 1 << 16)  # the protocol and every other descriptor of the supervisor
        os.chdir(WORK)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        set_limits(int(job.get("memory_mb", 512)), int(timeout) + 1, int(job.get("file_bytes", 32 << 20)),
                   int(job.get("processes", 32)))
        language = job.get("language", "python")
        if language in ("python", "python3"):
            code = run_user_code(job["code"])
            sys.stdout.flush()
            sys.stderr.flush()
        else:
            interpreter, suffix = LANGUAGES[language]
            script = os.path.join(ROOT, "main" + suffix)
            os.execv(interpreter, [os.path.basename(interpreter), script])
    except BaseException:
        code = 70
    os._exit(code)


def supervise(job):
    """Run one job in a child of this supervisor and collect what it did."""
    started = time.monotonic()
    timeout = float(job.get("timeout", 10))
    limit = int(job.get("max_output_bytes", 65536))
    language = job.get("language", "python")
    if language not in ("python", "python3") and language not in LANGUAGES:
        return {"sandbox_error": f"language {language!r} is not supported", "return_code": None}
    try:
        write_files(job.get("files"))
        if language in LANGUAGES:
            with open(os.path.join(ROOT, "main" + LANGUAGES[language][1]), "w") as handle:
                handle.write(job["code"])
    except (ValueError, OSError) as error:
        return {"sandbox_error": str(error), "return_code": None}
    stdin_fd = os.memfd_create("stdin")  # any size, where a pipe holds 64 KiB
    data = memoryview(job.get("stdin", "").encode())
    while data:
        data = data[os.write(stdin_fd, data):]
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        job_child(job, stdin_fd, out_w, err_w, timeout)
    for fd in (stdin_fd, out_w, err_w):
        os.close(fd)
    kept, dropped, timed_out, status = read_capped([out_r, err_r], started + timeout, limit, pid)
    if timed_out:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.close(out_r)
    os.close(err_r)
    if status is None:
        _, status = os.waitpid(pid, 0)
    if not OWN_NAMESPACES:  # the process backend shares the host's pid namespace: the job's group only
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    duration = time.monotonic() - started
    stderr = text(kept[err_r], dropped[err_r])
    result = {
        "stdout": text(kept[out_r], dropped[out_r]),
        "stderr": stderr,
        "return_code": os.waitstatus_to_exitcode(status),
        "timed_out": timed_out,
        "memory_exceeded": "MemoryError" in stderr[-2000:],
        "duration_s": duration,
    }
    if job.get("fetch_files"):
        result["files"], result["files_missing"] = fetch_files(job["fetch_files"],
                                                               int(job.get("max_fetch_bytes", MAX_FETCH_BYTES)))
    return result


# -- cleanup -------------------------------------------------------------------------------------

def kill_everything_else(deadline, spare=(1,)):
    """Kill and reap every process of this pid namespace except ``spare`` and this one. True when
    none is left. Orphans come to this process (a subreaper) or to init, so all are reaped."""
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
    for kind, remove in (("shm", lambda i: libc().shmctl(i, ipc_rmid, None)),
                         ("sem", lambda i: libc().semctl(i, 0, ipc_rmid)),
                         ("msg", lambda i: libc().msgctl(i, ipc_rmid, None))):
        try:
            with open(f"/proc/sysvipc/{kind}") as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            remove(int(row.split()[1]))


def wipe(directory, deadline):
    """Empty ``directory`` without recursion (a 3000-deep tree must not raise RecursionError),
    unlocking what the job locked (``chmod 000``: it is our uid's). False past the deadline."""
    stack = [directory]
    while stack:
        path = stack[-1]
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            os.chmod(path, 0o700)
        pushed = False
        with os.scandir(path) as entries:
            for entry in entries:
                if time.monotonic() > deadline:
                    return False
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                    pushed = True
                else:
                    os.unlink(entry.path)
        if not pushed:
            stack.pop()
            if path != directory:
                os.rmdir(path)
    return True


def workdir_is_clean():
    try:
        work = os.lstat(WORK)
        return (os.listdir(ROOT) == ["work"] and stat.S_ISDIR(work.st_mode) and stat.S_IMODE(work.st_mode) == 0o755
                and not os.listdir(WORK) and stat.S_IMODE(os.stat(ROOT).st_mode) == ROOT_MODE)
    except OSError:
        return False


def clean_up(deadline):
    """Leave the sandbox as the zygote made it; the reason if that was not possible in time."""
    try:
        if OWN_NAMESPACES:
            if not kill_everything_else(deadline):
                return "processes of the job survived being killed"
            remove_ipc_objects()
        if not workdir_is_clean():
            if not wipe(ROOT, deadline):
                return f"emptying the work directory took over {CLEANUP_S:g} s"
            os.chmod(ROOT, ROOT_MODE)
            os.mkdir(WORK, 0o755)
            os.chmod(WORK, 0o755)  # whatever the umask
        if OWN_NAMESPACES:
            try:
                dirty = bool(os.listdir(SHM))
            except OSError:  # locked by the job
                dirty = True
            if dirty and not wipe(SHM, deadline):
                return f"emptying /dev/shm took over {CLEANUP_S:g} s"
    except BaseException as error:  # whatever the job left, the worker is replaced rather than trusted
        return f"cleanup failed: {type(error).__name__}: {error}"
    return None


def supervisor(request_fd, reply_fd):
    """The per-job process forked by the zygote: read one job, run it, clean up, reply. Its exit
    status tells the zygote whether the sandbox may serve another job (0) or not."""
    libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # the job's orphans come here, not to the zygote
    job = read_frame(request_fd)
    if job is None:
        return 3  # the host closed the pipe
    try:
        result = supervise(job)
    except BaseException as error:
        result = {"sandbox_error": f"{type(error).__name__}: {error}", "return_code": None}
    started = time.monotonic()
    reason = clean_up(started + CLEANUP_S)
    result["cleanup_s"] = time.monotonic() - started
    if reason:
        result["replace_worker"] = reason
    write_frame(reply_fd, result)
    return 4 if reason else 0


def zygote(request_fd, reply_fd):
    """Fork a supervisor whenever a request waits; never read one. Exits (and the host replaces
    this sandbox) if a supervisor did not finish cleanly."""
    while True:
        select.select([request_fd], [], [])
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                code = supervisor(request_fd, reply_fd)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == 3:
            sys.exit(0)  # the host is gone
        if code not in (0, 4):
            # The job killed its supervisor (same uid) before it wrote anything: say so, as the
            # job's failure, and let the host replace this sandbox rather than clean up here,
            # which would pass the job's file names through the zygote's memory.
            write_frame(reply_fd, {"stdout": "", "stderr": "the job killed the process supervising it\n",
                                   "return_code": code if code < 0 else 1, "replace_worker": "the supervisor died"})
        if code != 0:
            sys.exit(1)
        if OWN_NAMESPACES and not kill_everything_else(time.monotonic() + CLEANUP_S):
            sys.exit(1)


def protect_zygote():
    """Jobs run as the zygote's uid. Non-dumpable, its memory and descriptors are out of their reach
    (``/proc/<pid>/mem``, ``/proc/<pid>/fd``), so no job can plant state for the next one. Its
    children inherit the flag, so it also covers them; they need nothing that it forbids."""
    if libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        import ctypes

        sys.exit(f"cannot make the zygote non-dumpable (errno {ctypes.get_errno()})")
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


def session_worker(request_fd, reply_fd, memory_mb):
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
    mode = sys.argv[1] if len(sys.argv) > 1 else "pool"
    memory_mb = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    for module in sys.argv[3:]:
        try:
            __import__(module)  # warm imports: forked children get them for free
        except ImportError:
            pass
    protect_zygote()
    os.makedirs(WORK, exist_ok=True)
    os.chmod(WORK, 0o755)
    ROOT_MODE = stat.S_IMODE(os.stat(ROOT).st_mode)
    # The protocol moves to private descriptors; 0 and 1 become /dev/null.
    request_fd, reply_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    write_frame(reply_fd, {"ready": True})
    if mode == "pool":
        zygote(request_fd, reply_fd)
    else:
        session_worker(request_fd, reply_fd, memory_mb)


ROOT_MODE = 0o755

if __name__ == "__main__":
    main()
