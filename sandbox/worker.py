"""The process that lives inside a sandbox. Standard library only; talks JSON lines on stdin/stdout.

``pool`` mode (a zygote): heavy modules are imported once; every job runs in a freshly forked
child with its own rlimits and a wiped work directory, and after it every other process in the
sandbox's pid namespace is killed. User code never runs in the zygote, so nothing leaks from one
job to the next.

``session`` mode: one trajectory's persistent interpreter; code runs in a long-lived namespace so
variables survive between calls. The host kills the whole sandbox if a call overruns.
"""

import base64
import json
import linecache
import os
import resource
import select
import shutil
import signal
import stat
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
PR_SET_DUMPABLE = 4
MARK = "\n[... output truncated: {} more bytes ...]\n"


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


def kill_everything_else():
    """Kill and reap every process of this pid namespace except this worker (its init), so
    daemonised grandchildren die too: orphans are re-parented to init, so all are our children."""
    me = os.getpid()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        others = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, me)]
        if not others:
            return
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
    import ctypes

    libc = ctypes.CDLL(None)
    ipc_rmid = 0
    for kind, remove in (("shm", lambda i: libc.shmctl(i, ipc_rmid, None)),
                         ("sem", lambda i: libc.semctl(i, 0, ipc_rmid)),
                         ("msg", lambda i: libc.msgctl(i, ipc_rmid, None))):
        try:
            with open(f"/proc/sysvipc/{kind}") as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            remove(int(row.split()[1]))


def wipe(directory):
    """Empty ``directory``, also what a job locked (``chmod 000``): it belongs to our uid."""
    def unlock_and_retry(function, path, _):
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, onerror=unlock_and_retry)
        else:
            function(path)

    os.chmod(directory, stat.S_IMODE(os.stat(directory).st_mode) | 0o700)
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=unlock_and_retry)
        else:
            os.unlink(path)


def reset_workdir(files):
    """An empty work directory, as the zygote made it. Wiping costs most of a millisecond, so
    an untouched one (the common case) is left as it is."""
    try:
        work = os.lstat(WORK)
        clean = (os.listdir(ROOT) == ["work"] and stat.S_ISDIR(work.st_mode) and stat.S_IMODE(work.st_mode) == 0o755
                 and not os.listdir(WORK))
    except OSError:
        clean = False
    if not clean:
        wipe(ROOT)
        os.mkdir(WORK, 0o755)
        os.chmod(WORK, 0o755)  # whatever the umask
    if OWN_NAMESPACES:
        try:
            dirty = bool(os.listdir(SHM))
        except OSError:  # locked by the job
            dirty = True
        if dirty:
            wipe(SHM)
    for name, content in (files or {}).items():
        target = os.path.normpath(os.path.join(WORK, name))
        if not target.startswith(WORK + "/"):
            raise ValueError(f"file name {name!r} leaves the work directory")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as handle:
            handle.write(base64.b64decode(content))


def pool_job(job, protocol_fds):
    started = time.monotonic()
    timeout = float(job.get("timeout", 10))
    limit = int(job.get("max_output_bytes", 65536))
    try:
        reset_workdir(job.get("files"))
    except (ValueError, OSError) as error:
        return {"sandbox_error": str(error), "return_code": None}
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w, *protocol_fds):
                os.close(fd)
            os.chdir(WORK)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            set_limits(int(job.get("memory_mb", 512)), int(timeout) + 1, int(job.get("file_bytes", 32 << 20)),
                       int(job.get("processes", 32)))
            code = run_user_code(job["code"])
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            code = 70
        os._exit(code)
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    data = job.get("stdin", "").encode()
    try:
        if data:
            os.write(in_w, data[:65536])
    except OSError:
        pass
    os.close(in_w)
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
    if OWN_NAMESPACES:
        kill_everything_else()  # every leftover, including daemonised grandchildren
        remove_ipc_objects()
    else:
        try:
            os.killpg(pid, signal.SIGKILL)  # the job's process group
        except (ProcessLookupError, PermissionError):
            pass
    return_code = os.waitstatus_to_exitcode(status)
    stderr = text(kept[err_r], dropped[err_r])
    return {
        "stdout": text(kept[out_r], dropped[out_r]),
        "stderr": stderr,
        "return_code": return_code,
        "timed_out": timed_out,
        "memory_exceeded": "MemoryError" in stderr[-2000:],
        "duration_s": time.monotonic() - started,
    }


def protect_zygote():
    """Jobs run as the zygote's uid. Non-dumpable, its memory and descriptors are out of their reach
    (``/proc/<pid>/mem``, ``/proc/<pid>/fd``), so no job can plant state for the next one. Its
    children inherit the flag, so it also covers them; they need nothing that it forbids."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        sys.exit(f"cannot make the zygote non-dumpable (errno {ctypes.get_errno()})")
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Timeout(Exception):
    pass


def session_job(job, namespace):
    started = time.monotonic()
    limit = int(job.get("max_output_bytes", 65536))
    paths = (os.path.join(ROOT, ".stdout"), os.path.join(ROOT, ".stderr"))
    saved = (os.dup(1), os.dup(2))
    for fd, path in zip((1, 2), paths):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)

    def on_alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(job.get("timeout", 10)))
    timed_out = False
    return_code = 0
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
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    outputs = []
    for path in paths:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
            size = os.fstat(handle.fileno()).st_size
        outputs.append(text(data[:limit], max(size - limit, 0)))
    stderr = outputs[1]
    return {"stdout": outputs[0], "stderr": stderr, "return_code": return_code, "timed_out": timed_out,
            "memory_exceeded": "MemoryError" in stderr[-2000:], "duration_s": time.monotonic() - started}


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "pool"
    memory_mb = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    for module in sys.argv[3:]:
        try:
            __import__(module)  # warm imports: forked children get them for free
        except ImportError:
            pass
    if mode == "pool":
        protect_zygote()
    os.makedirs(WORK, exist_ok=True)
    os.chmod(WORK, 0o755)
    # The protocol moves to private descriptors so user code cannot write on it.
    request_fd, reply_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    requests = os.fdopen(request_fd, "r")
    replies = os.fdopen(reply_fd, "w")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    if mode == "session":
        os.chdir(WORK)
        set_limits(memory_mb, 10**6, 32 << 20, 32)  # time is enforced per call and by the host
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        job = json.loads(line)
        if mode == "pool":
            result = pool_job(job, (request_fd, reply_fd, null))
        else:
            result = session_job(job, namespace)
        replies.write(json.dumps(result) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
