"""The process that lives inside a sandbox. Standard library only; talks length-prefixed JSON frames
(a 4-byte big-endian length, then the JSON) on stdin/stdout.

``pool`` mode. Three roles. The *supervisor* is the sandbox's init (pid 1): it holds the host
protocol, reads each job, collects its output and cleans up after it. The *zygote* is forked by
the supervisor before any job, imports the heavy modules once and, for every job, only forks: it
never reads a job, so its memory never holds one. The *job* process, forked from the zygote,
reads its own job from a pipe, becomes it (fresh descriptors 0-2, rlimits) and runs the code. No
process that ever held one job's code, stdin, output or files is the parent of the next job.
After each job the supervisor kills every other process of the sandbox, removes IPC objects and
empties ``/tmp`` and ``/dev/shm`` within a time bound, before replying, so the job that made the
mess pays for it; one that overran or failed makes the host replace the sandbox.

``session`` mode: see :mod:`worker_session`.
"""

import base64
import gc
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

try:  # inside a sandbox the worker's modules sit side by side; on the host they are a package
    from worker_cleanup import kill_everything_else, remove_ipc_objects, wipe, workdir_is_clean
except ImportError:
    from agentrl.sandbox.worker_cleanup import (
        kill_everything_else,
        remove_ipc_objects,
        wipe,
        workdir_is_clean,
    )

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


def text(data, dropped):
    out = data.decode("utf-8", "replace")
    return out + MARK.format(dropped) if dropped else out


def inside_work(name):
    target = os.path.normpath(os.path.join(WORK, name))
    if not target.startswith(WORK + "/"):
        raise ValueError(f"file name {name!r} leaves the work directory")
    return target


def write_files(files):
    for name, content in (files or {}).items():
        target = inside_work(name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as handle:
            handle.write(base64.b64decode(content))


def fetch_files(names, limit=MAX_FETCH_BYTES):
    """``(files, missing)``: the requested work-directory files as base64, within ``limit`` bytes
    in all, and for each one not returned the reason."""
    files, missing, total = {}, {}, 0
    for name in names:
        try:
            # Non-blocking: a FIFO planted under the requested name must not hang the supervisor.
            with open(os.open(inside_work(name), os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    missing[name] = "not a regular file"
                    continue
                data = handle.read(limit - total + 1)
        except ValueError:
            missing[name] = "the name leaves the work directory"
            continue
        except OSError as error:
            missing[name] = error.strerror or str(error)
            continue
        if total + len(data) > limit:
            missing[name] = f"over the {limit >> 20} MiB limit on fetched files"
            continue
        total += len(data)
        files[name] = base64.b64encode(data).decode()
    return files, missing


# -- the zygote and the job ----------------------------------------------------------------------

def job_process(job_r, out_w, err_w):
    """Forked by the zygote: read this job (the zygote never does), then become it, with fresh
    descriptors 0-2, nothing else open, and rlimits."""
    code = 70
    try:
        job = read_frame(job_r)
        os.setsid()
        language = job.get("language", "python")
        write_files(job.get("files"))
        if language in LANGUAGES:
            script = os.path.join(ROOT, "main" + LANGUAGES[language][1])
            with open(script, "w") as handle:
                handle.write(job["code"])
        stdin_fd = os.memfd_create("stdin")  # any size, where a pipe holds 64 KiB
        data = memoryview(job.get("stdin", "").encode())
        while data:
            data = data[os.write(stdin_fd, data):]
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 1 << 16)  # the zygote's channels and every other descriptor
        os.chdir(WORK)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        set_limits(int(job.get("memory_mb", 512)), int(float(job.get("timeout", 10))) + 1,
                   int(job.get("file_bytes", 32 << 20)), int(job.get("processes", 32)))
        if language in LANGUAGES:
            interpreter = LANGUAGES[language][0]
            os.execv(interpreter, [os.path.basename(interpreter), script])
        code = run_user_code(job["code"])
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(code)


def zygote(go_r, status_w, job_r, out_w, err_w, preload):
    """Import the heavy modules once, then for every go byte fork a job and report its exit
    status (and, outside a pid namespace of its own, first its pid, which the supervisor then needs
    to kill it): all the zygote ever learns of a job."""
    for module in preload:
        try:
            __import__(module)  # warm imports: forked jobs get them for free
        except ImportError:
            pass
    # Everything imported so far lives on in every job: frozen, the collector leaves it alone, so a
    # job's collections do not write (and copy) the pages of objects it never uses.
    gc.freeze()
    os.write(status_w, struct.pack(">i", 0))  # ready
    while os.read(go_r, 1):
        pid = os.fork()
        if pid == 0:
            job_process(job_r, out_w, err_w)
        if not OWN_NAMESPACES:
            os.write(status_w, struct.pack(">i", pid))
        _, status = os.waitpid(pid, 0)
        os.write(status_w, struct.pack(">i", status))
    os._exit(0)


class Supervisor:
    """The sandbox's init in pool mode: it holds the host protocol, hands each job to a process
    the zygote forks, collects its output and cleans up after it. It sees every job's data, but no
    job is ever forked from it, and jobs can neither signal it (init) nor read it (non-dumpable)."""

    def __init__(self, preload, protocol_fds):
        go_r, self.go_w = os.pipe()
        self.status_r, status_w = os.pipe()
        job_r, self.job_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        self.zygote = os.fork()  # before any job: its memory never holds one
        if self.zygote == 0:
            for fd in (*protocol_fds, self.go_w, self.status_r, self.job_w, self.out_r, self.err_r):
                os.close(fd)
            zygote(go_r, status_w, job_r, out_w, err_w, preload)
        for fd in (go_r, status_w, job_r, out_w, err_w):
            os.close(fd)
        for fd in (self.out_r, self.err_r, self.status_r, self.job_w):
            os.set_blocking(fd, False)
        if self._status(time.monotonic() + 60) != 0:
            sys.exit("the zygote did not start")

    def _status(self, deadline):
        """The zygote's next word, or None if it died or is silent past the deadline."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.status_r], [], [], remaining)[0]:
                return None
            try:
                word = os.read(self.status_r, 4)
            except BlockingIOError:
                continue
            return struct.unpack(">i", word)[0] if len(word) == 4 else None

    @staticmethod
    def _drain(fd, kept, limit):
        """Read what ``fd`` holds now; keep up to ``limit`` bytes in ``kept``; the number dropped."""
        dropped = 0
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return dropped
            if not chunk:
                return dropped
            room = max(limit - len(kept), 0)
            kept += chunk[:room]
            dropped += len(chunk) - min(len(chunk), room)

    def run(self, job, request):
        """Run ``job`` (decoded from the frame ``request``, which the job process reads itself)."""
        started = time.monotonic()
        timeout = float(job.get("timeout", 10))
        limit = int(job.get("max_output_bytes", 65536))
        language = job.get("language", "python")
        if language not in ("python", "python3") and language not in LANGUAGES:
            return {"sandbox_error": f"language {language!r} is not supported", "return_code": None}
        try:
            for name in job.get("files") or {}:
                inside_work(name)
        except ValueError as error:
            return {"sandbox_error": str(error), "return_code": None}
        deadline = started + timeout
        pending = memoryview(struct.pack(">I", len(request)) + request)
        os.write(self.go_w, b"g")  # the zygote forks; the job reads its request as it is written
        kept = {self.out_r: bytearray(), self.err_r: bytearray()}
        dropped = {self.out_r: 0, self.err_r: 0}
        expected = 1 if OWN_NAMESPACES else 2  # the zygote's words: [the job's pid,] its wait status
        words, timed_out = [], False
        while len(words) < expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            readable, writable, _ = select.select([self.out_r, self.err_r, self.status_r], [self.job_w] if pending else [],
                                                  [], remaining)
            if writable:
                try:
                    pending = pending[os.write(self.job_w, pending):]
                except BlockingIOError:
                    pass
            for fd in readable:
                if fd == self.status_r:
                    word = self._status(time.monotonic() + 1)
                    if word is None:
                        return self._lost_zygote(kept, dropped, started)
                    words.append(word)
                else:
                    dropped[fd] += self._drain(fd, kept[fd], limit)
        if timed_out:
            if pending:  # the job never took its request: the zygote is not working
                return self._lost_zygote(kept, dropped, started)
            self._kill_job(words[0] if words and not OWN_NAMESPACES else None)
            while len(words) < expected:
                word = self._status(time.monotonic() + CLEANUP_S)
                if word is None:
                    return self._lost_zygote(kept, dropped, started)
                words.append(word)
        status = words[-1]
        for fd in kept:
            dropped[fd] += self._drain(fd, kept[fd], limit)
        stderr = text(kept[self.err_r], dropped[self.err_r])
        result = {
            "stdout": text(kept[self.out_r], dropped[self.out_r]), "stderr": stderr,
            "return_code": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
            "memory_exceeded": "MemoryError" in stderr[-2000:], "duration_s": time.monotonic() - started,
        }
        if job.get("fetch_files"):
            result["files"], result["files_missing"] = fetch_files(job["fetch_files"],
                                                                   int(job.get("max_fetch_bytes", MAX_FETCH_BYTES)))
        return result

    def _kill_job(self, pid):
        if OWN_NAMESPACES:  # only in its own pid namespace may the supervisor kill whatever it sees
            kill_everything_else(time.monotonic() + CLEANUP_S, spare=(1, self.zygote))
        elif pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _lost_zygote(self, kept, dropped, started):
        """The job killed the zygote (same uid): its failure, and this sandbox is replaced."""
        stderr = text(kept[self.err_r], dropped[self.err_r]) + "\nthe job killed the sandbox's zygote\n"
        return {"stdout": text(kept[self.out_r], dropped[self.out_r]), "stderr": stderr, "return_code": -9,
                "timed_out": False, "duration_s": time.monotonic() - started, "replace_worker": "the zygote died"}

    def clean_up(self, deadline):
        """Leave the sandbox as the zygote made it; the reason if that was not possible in time."""
        try:
            if OWN_NAMESPACES:
                if not kill_everything_else(deadline, spare=(1, self.zygote)):
                    return "processes of the job survived being killed"
                remove_ipc_objects()
            for fd in (self.out_r, self.err_r):  # what a leftover wrote after the job ended
                self._drain(fd, bytearray(), 0)
            if not workdir_is_clean(ROOT_MODE):
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


def serve_pool(request_fd, reply_fd, preload):
    supervisor = Supervisor(preload, (request_fd, reply_fd))
    write_frame(reply_fd, {"ready": True})
    while True:
        header = read_exactly(request_fd, 4)
        request = header and read_exactly(request_fd, struct.unpack(">I", header)[0])
        if not request:
            return
        try:
            result = supervisor.run(json.loads(request), request)
        except BaseException as error:
            result = {"sandbox_error": f"{type(error).__name__}: {error}", "return_code": None,
                      "replace_worker": "the supervisor failed"}
        started = time.monotonic()
        if not result.get("replace_worker"):  # a sandbox about to be replaced needs no cleaning
            reason = supervisor.clean_up(started + CLEANUP_S)  # the job that made the mess pays for it
            if reason:
                result["replace_worker"] = reason
        result["cleanup_s"] = time.monotonic() - started
        write_frame(reply_fd, result)
        if result.get("replace_worker"):
            return


def protect_zygote():
    """Jobs run as the zygote's uid. Non-dumpable, its memory and descriptors are out of their reach
    (``/proc/<pid>/mem``, ``/proc/<pid>/fd``), so no job can plant state for the next one. Its
    children inherit the flag, so it also covers them; they need nothing that it forbids."""
    if libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        import ctypes

        sys.exit(f"cannot make the zygote non-dumpable (errno {ctypes.get_errno()})")
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main():
    global ROOT_MODE
    mode = sys.argv[1] if len(sys.argv) > 1 else "pool"
    memory_mb = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    try:  # if the host runs out of memory, the kernel kills sandboxes first, not the trainer (before
        # protect_zygote: a non-dumpable process's /proc/self files belong to root)
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
    except OSError:
        pass
    protect_zygote()
    libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # outside a pid namespace, orphans still come here
    os.makedirs(WORK, exist_ok=True)
    os.chmod(WORK, 0o755)
    ROOT_MODE = stat.S_IMODE(os.stat(ROOT).st_mode)
    # The protocol moves to private descriptors; 0 and 1 become /dev/null.
    request_fd, reply_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    if mode == "pool":
        serve_pool(request_fd, reply_fd, sys.argv[3:])
    else:
        from worker_session import serve_session

        serve_session(request_fd, reply_fd, memory_mb)


ROOT_MODE = 0o755

if __name__ == "__main__":
    main()
