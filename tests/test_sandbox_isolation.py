"""The warm pool forgets: no byte of one job (code, stdin, stdout, files) is readable by the next;
sessions cannot hang or flood the host; the seccomp filter refuses the kernel's riskiest
interfaces; a job's mess is cleaned up at its own expense; uids come from a free list."""

import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from agentrl.sandbox.base import get_backend

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="bubblewrap is not installed")

MARKER = "ZQXJK"  # every secret is MARKER + 32 hex digits; a finder knows only their SHA-256
CHANNELS = ("code", "stdin", "stdout", "files")


def secret() -> str:
    return MARKER + secrets.token_hex(16)


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# Runs as the next job: it knows the secrets' digests only, so finding one proves a leak.
FINDER = textwrap.dedent(r"""
    import hashlib, json, os, re
    WANTED = json.loads(WANTED_JSON)
    pattern = re.compile(MARKER_TEXT.encode() + rb"[0-9a-f]{32}")
    found = {}

    def scan(data, where):
        for match in pattern.finditer(data):
            name = WANTED.get(hashlib.sha256(match.group()).hexdigest())
            if name:
                found.setdefault(name, set()).add(where)

    def scan_memory(pid, where):
        try:
            maps = open(f"/proc/{pid}/maps").read().splitlines()
            mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError:
            return
        for line in maps:
            span, perms = line.split()[:2]
            if "r" not in perms or line.endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            for offset in range(start, end, 1 << 20):
                try:
                    scan(os.pread(mem, min(1 << 20, end - offset) + 64, offset), where)
                except OSError:
                    break
        os.close(mem)

    def scan_own_memory():
        # /proc/self/mem is root's in a non-dumpable process: copy each mapping through a memfd
        # instead (the kernel answers EFAULT for what cannot be read, where a load would crash).
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.write.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
        libc.write.restype = ctypes.c_ssize_t
        copy = os.memfd_create("scan")
        for line in open("/proc/self/maps").read().splitlines():
            span, perms = line.split()[:2]
            if "r" not in perms or line.endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            for offset in range(start, end, 1 << 20):
                os.ftruncate(copy, 0)
                os.lseek(copy, 0, 0)
                size = libc.write(copy, offset, min((1 << 20) + 64, end - offset))
                if size > 0:
                    scan(os.pread(copy, size, 0), "own memory")
        os.close(copy)

    scan_own_memory()
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.set_blocking(int(fd), False)
            scan(os.pread(int(fd), 1 << 22, 0), f"fd {fd}")
        except OSError:
            try:
                scan(os.read(int(fd), 1 << 22), f"fd {fd}")
            except OSError:
                pass
    for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self"]:
        for leaf in ("cmdline", "environ", "stat", "status", "io"):
            try:
                scan(open(f"/proc/{pid}/{leaf}", "rb").read(), f"/proc/{pid}/{leaf}")
            except OSError:
                pass
        if pid not in ("self", str(os.getpid())):
            scan_memory(pid, f"/proc/{pid}/mem")
    for top in ("/tmp", "/dev/shm"):
        for folder, _, names in os.walk(top):
            for name in names:
                try:
                    scan(open(os.path.join(folder, name), "rb").read(), os.path.join(folder, name))
                except OSError:
                    pass
    print(json.dumps({name: sorted(places) for name, places in found.items()}))
""")


def finder_code(planted: dict[str, str]) -> str:
    wanted = json.dumps({digest(value): name for name, value in planted.items()})
    return f"WANTED_JSON = {wanted!r}\nMARKER_TEXT = {MARKER!r}\n" + FINDER


def scan_from_host(pid: int, planted: dict[str, str]) -> set[str]:
    """Which secrets are in the memory of host process ``pid`` (readable to root only)."""
    wanted = {value.encode(): name for name, value in planted.items()}
    found = set()
    with open(f"/proc/{pid}/maps") as handle:
        maps = handle.read().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if "r" not in perms or line.endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue
            found |= {name for value, name in wanted.items() if value in data}
    return found


def zygotes(backend) -> list[int]:
    """The idle workers' zygotes, the processes jobs are forked from: the child of the sandbox's
    init (the supervisor, bwrap's only child), or init itself where it has none."""
    found = []
    for worker in list(backend._idle.queue):
        for init in psutil.Process(worker.process.pid).children():
            found += [p.pid for p in init.children()] or [init.pid]
    return found


def sandbox_tree(backend) -> list[psutil.Process]:
    """Every process inside the idle workers' sandboxes once they settle: init and the zygote."""
    deadline = time.monotonic() + 3
    while True:
        tree = [p for worker in list(backend._idle.queue) for p in psutil.Process(worker.process.pid).children(recursive=True)]
        if len(tree) <= 2 * len(backend._idle.queue) or time.monotonic() > deadline:
            return tree
        time.sleep(0.05)


@pytest.fixture()
def single():
    backend = get_backend("bwrap", pool_size=1)  # one warm worker: every job runs on the same zygote
    yield backend
    backend.close()


def test_no_byte_of_a_job_is_readable_by_the_next(single):
    planted = {name: secret() for name in CHANNELS}
    code = (f"kept = {planted['code']!r}\nimport sys\nseen = sys.stdin.read()\nfile = open('data.bin').read()\n"
            f"print({planted['stdout'][::-1]!r}[::-1])\n")
    first = single.run(code, stdin=planted["stdin"], files={"data.bin": planted["files"].encode()})
    assert first.ok and first.stdout == planted["stdout"] + "\n", first
    if os.geteuid() == 0:  # root can read the non-dumpable zygote's memory from outside
        for pid in zygotes(single):
            assert scan_from_host(pid, planted) == set(), f"the zygote {pid} holds the previous job's data"
    second = single.run(finder_code(planted), timeout=30, memory_mb=1024)
    assert second.ok, second
    assert json.loads(second.stdout) == {}, f"the next job found the previous job's data: {second.stdout}"


def test_stdin_is_not_cut_at_the_pipe_size(single):
    result = single.run("import sys\nprint(len(sys.stdin.read()))", stdin="x" * 300_000)
    assert result.stdout == "300000\n"


def run_with_deadline(function, seconds: float):
    """``function()`` in a daemon thread; the result, or AssertionError if it has not returned in time."""
    box = []
    thread = threading.Thread(target=lambda: box.append(function()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert box, f"no answer within {seconds} s: user code hung the host"
    return box[0]


ALL_FDS = "import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, {payload})\n    except OSError:\n        pass\n"


@pytest.mark.parametrize("payload, rest", [
    ("b'{\"stdout\": \"forged\"'", ""),  # an unterminated line on every descriptor
    ("b'{\"stdout\": \"forged\", \"return_code\": 0}\\n'", ""),  # a forged complete reply
    ("b'A' * 65536", "while True:\n    for fd in range(3, 256):\n        try:\n            os.write(fd, b'A' * 65536)\n"
                     "        except OSError:\n            pass\n"),  # a flood
])
def test_session_code_cannot_hang_or_flood_the_host(single, payload, rest):
    session = single.session()
    try:
        assert session.run("kept = 41").ok
        started = time.monotonic()
        result = run_with_deadline(lambda: session.run(ALL_FDS.format(payload=payload) + rest, timeout=3), 20)
        assert time.monotonic() - started < 20
        assert "forged" not in result.stdout and "restarted" in result.stderr, result  # a clear error
        after = run_with_deadline(lambda: session.run("print(globals().get('kept', 'restarted'))"), 30)
        assert after.stdout.endswith(("41\n", "restarted\n")), after
        rss = psutil.Process().memory_info().rss
        assert rss < 4 << 30  # the host did not buffer an endless line
    finally:
        run_with_deadline(session.close, 20)


@pytest.mark.skipif(os.geteuid() != 0, reason="reading a sandbox process's descriptors needs root")
def test_session_user_code_does_not_hold_the_host_protocol(single):
    session = single.session()
    try:
        assert session.run("x = 1").ok
        process = session.worker.process
        protocol = {f"pipe:[{os.fstat(stream.fileno()).st_ino}]" for stream in (process.stdin, process.stdout)}
        pid = session_pid(session)
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert not protocol & held, f"the process running user code holds the host protocol: {held}"
    finally:
        session.close()


def session_pid(session) -> int:
    """The host pid of the process that runs a session's user code: the deepest worker.py."""
    tree = [p for p in psutil.Process(session.worker.process.pid).children(recursive=True)
            if "worker.py" in " ".join(p.cmdline())]
    return max(tree, key=lambda p: len(p.parents())).pid


DENIED = {  # name: (x86_64 number, arguments): each reaches the kernel on an unfiltered system
    "io_uring_setup": (425, (1, "buf")), "io_uring_enter": (426, (0, 0, 0, 0, 0, 0)),
    "io_uring_register": (427, (0, 0, 0, 0)), "bpf": (321, (0, "buf", 48)), "userfaultfd": (323, (1,)),
    "perf_event_open": (298, ("buf", 0, -1, -1, 0)), "keyctl": (250, (0, 0, 0, 0, 0)),
    "add_key": (248, (b"user", b"k", b"v", 1, -4)), "request_key": (249, (b"user", b"k", 0, 0)),
    "mount": (165, (b"none", b"/tmp", b"tmpfs", 0, 0)), "umount2": (166, (b"/tmp", 0)),
    "pivot_root": (155, (b"/tmp", b"/tmp")), "unshare": (272, (0x20000,)), "setns": (308, (0, 0)),
    "open_tree": (428, (-100, b"/tmp", 0)), "move_mount": (429, (-1, b"", -100, b"/tmp", 0)),
    "fsopen": (430, (b"tmpfs", 0)), "fsconfig": (431, (-1, 0, 0, 0, 0)), "fsmount": (432, (-1, 0, 0)),
    "fspick": (433, (-100, b"/tmp", 0)), "mount_setattr": (442, (-100, b"/tmp", 0, 0, 0)),
    "modify_ldt": (154, (0, "buf", 16)), "clone_newns": (56, (0x20000 | 17, 0, 0, 0, 0)),
    "clone_newnet": (56, (0x40000000 | 17, 0, 0, 0, 0)), "clone_newuser": (56, (0x10000000 | 17, 0, 0, 0, 0)),
    "open_by_handle_at": (304, (-1, "buf", 0)), "name_to_handle_at": (303, (-100, b"/tmp", "buf", "buf", 0)),
    "statmount": (457, ("buf", "buf", 4096, 0)), "listmount": (458, ("buf", "buf", 16, 0)),
}


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_the_container_seccomp_profile_allows_every_syscall_bubblewrap_makes(single, tmp_path):
    """compose.yaml's profile for the services that run bubblewrap (sandbox/seccomp-docker.json)
    must not deny what bwrap itself calls to build this backend's sandbox."""
    profile = json.loads((Path(__file__).parents[1] / "sandbox" / "seccomp-docker.json").read_text())
    denied = {name for rule in profile["syscalls"] for name in rule["names"]}
    command = single.command("pool", 256)
    command = command[:command.index("--chdir")] + ["/bin/true"]
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), *command], check=True, timeout=60)
    made = {match.group(1) for match in re.finditer(r"^\d+ +([a-z0-9_]+)\(", trace.read_text(), re.MULTILINE)}
    assert {"clone", "mount", "pivot_root", "umount2", "unshare"} <= made
    assert not made & denied, made & denied
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW" and {"bpf", "io_uring_setup", "keyctl", "setns"} <= denied


def test_mountinfo_does_not_show_where_the_project_lives(single):
    """The worker's modules are copied in, not bound: no mount names their host directory. (A bound
    package directory does show its host path: the kernel lists a bind's source.)"""
    import agentrl.sandbox.bwrap as bwrap

    result = single.run("print(open('/proc/self/mountinfo').read() + open('/proc/self/mounts').read())\n"
                        "import os\nprint(sorted(os.listdir('/opt/agentrl')))")
    assert result.ok, result
    project = str(bwrap.WORKER.resolve().parent)
    assert project not in result.stdout and "/opt/agentrl" not in result.stdout.split("\n[")[0]
    assert "['worker.py', 'worker_cleanup.py', 'worker_session.py']" in result.stdout


@pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers are x86_64's")
def test_seccomp_denies_the_kernel_attack_surface(single):
    calls = {name: (number, [a if a != "buf" else None for a in args]) for name, (number, args) in DENIED.items()}
    code = textwrap.dedent(f"""
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        buf = ctypes.create_string_buffer(4096)
        for name, (number, args) in {calls!r}.items():
            ctypes.set_errno(0)
            value = libc.syscall(number, *[buf if a is None else a for a in args])
            if value == 0 and name.startswith("clone"):
                os._exit(0)  # the child of a clone that went through
            print(name, value, errno.errorcode.get(ctypes.get_errno()))
        ctypes.set_errno(0)
        print("clone3", libc.syscall(435, 0, 0), errno.errorcode.get(ctypes.get_errno()))
        pid = os.fork()  # plain fork and threads still work
        if pid == 0:
            os._exit(7)
        import threading
        box = []
        thread = threading.Thread(target=lambda: box.append(1))
        thread.start()
        thread.join()
        print("fork", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), "thread", box)
    """)
    result = single.run(code)
    assert result.ok, result
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for name in DENIED:
        assert lines[name] == "-1 EPERM", f"{name}: {lines[name]}"
    assert lines["clone3"] == "-1 ENOSYS"  # glibc then falls back to clone, whose flags are checked
    assert lines["fork"] == "7 thread [1]"


def test_a_messy_job_pays_for_its_own_cleanup(single):
    mess = textwrap.dedent("""
        import os, time
        for i in range(30000):
            open(f'f{i}', 'w').close()
        os.mkdir('deep')
        os.chdir('deep')
        for _ in range(3000):
            os.mkdir('d')
            os.chdir('d')
        os.chmod('.', 0)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(300)
            os._exit(0)
        print('messy')
    """)
    started = time.monotonic()
    first = single.run(mess, timeout=30)
    assert first.ok and first.stdout == "messy\n", first
    assert time.monotonic() - started < 60
    started = time.monotonic()
    second = single.run("import os\nprint(os.listdir('.'), os.listdir('/tmp'), len([p for p in os.listdir('/proc') if p.isdigit()]))")
    latency = time.monotonic() - started
    assert second.ok, second
    assert second.stdout.startswith("[] ['work'] "), second.stdout
    assert int(second.stdout.split()[-1]) <= 3, "a process of the previous job survived"
    assert latency < 1.5, f"the next job waited {latency:.2f} s for the previous job's cleanup"
    assert len(sandbox_tree(single)) == 2  # only the supervisor and the zygote are left between jobs


@pytest.mark.skipif(os.geteuid() != 0, reason="uids are separated only when the host process is root")
def test_no_two_live_sandboxes_share_a_uid(single):
    other = get_backend("bwrap", pool_size=2)  # a second backend in the same process
    sessions = [single.session() for _ in range(3)]
    try:
        for session in sessions:
            assert session.run("pass").ok
        workers = [*single._idle.queue, *other._idle.queue, *(s.worker for s in sessions)]
        uids = [psutil.Process(w.process.pid).uids().real for w in workers]
        assert len(uids) == 6 and len(set(uids)) == 6, uids
        freed = uids[-2]
        sessions[1].close()
        again = single.session()
        sessions.append(again)
        assert again.run("pass").ok
        live = [psutil.Process(w.process.pid).uids().real
                for w in [*single._idle.queue, *other._idle.queue, *(s.worker for s in sessions if s.worker)]]
        assert len(live) == len(set(live)) == 6 and freed not in uids[:-2]
    finally:
        for session in sessions:
            session.close()
        other.close()


def test_uid_leases_are_a_free_list_shared_between_processes(tmp_path):
    from agentrl.sandbox.uids import lease_uid

    first, second, third = (lease_uid(70000, tmp_path) for _ in range(3))
    assert [first.uid, second.uid, third.uid] == [70000, 70001, 70002]
    second.release()
    assert lease_uid(70000, tmp_path).uid == 70001  # the freed uid is the first one taken again
    # Another process leases past the uids this one holds, and its leases end when it exits.
    code = ("import sys\nfrom agentrl.sandbox.uids import lease_uid\nfrom pathlib import Path\n"
            f"print(lease_uid(70000, Path({str(tmp_path)!r})).uid)")
    outside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert outside.stdout == "70003\n", outside.stderr
    assert lease_uid(70000, tmp_path).uid == 70003


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become an unprivileged user")
def test_a_clear_warning_when_uids_cannot_be_separated():
    code = ("import warnings\nwarnings.simplefilter('always')\nfrom agentrl.sandbox.base import get_backend\n"
            "b = get_backend('bwrap', pool_size=1)\nprint(b.run('print(1)').stdout, end='')\nb.close()")
    result = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=60, cwd="/", env={**os.environ, "HOME": "/tmp"})
    assert result.stdout == "1\n", result.stderr
    assert re.search(r"not root.*share.*uid", result.stderr, re.S), result.stderr


def test_sandboxes_are_the_first_the_kernel_kills_when_memory_runs_out(single):
    assert single.run("print(open('/proc/self/oom_score_adj').read().strip())").stdout == "1000\n"
    session = single.session()
    try:
        assert session.run("print(open('/proc/self/oom_score_adj').read().strip())").stdout == "1000\n"
    finally:
        session.close()


def test_without_a_delegated_cgroup_the_backend_still_runs(tmp_path, single):
    from agentrl.sandbox.cgroup import delegated_cgroup

    assert delegated_cgroup(str(tmp_path)) is None  # a plain directory is not a cgroup with memory delegated
    assert delegated_cgroup(str(tmp_path / "missing")) is None
    if delegated_cgroup() is None:
        assert single.cgroup_parent is None and single.run("print(1)").ok


@pytest.mark.skipif(__import__("agentrl.sandbox.cgroup", fromlist=["x"]).delegated_cgroup() is None,
                    reason="no cgroup v2 with the memory controller is delegated here")
def test_a_delegated_cgroup_bounds_the_sandbox_not_each_process():
    backend = get_backend("bwrap", pool_size=1)
    try:
        # Four processes of 150 MB each: each is under its 256 MB RLIMIT_AS, the sum is not.
        code = textwrap.dedent("""
            import os, time
            pids = []
            for _ in range(4):
                pid = os.fork()
                if pid == 0:
                    block = bytearray(150 << 20)
                    time.sleep(2)
                    os._exit(0)
                pids.append(pid)
            print(sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids))
        """)
        result = backend.run(code, memory_mb=256, timeout=20)
        assert result.memory_exceeded and "-9" in result.stdout, result
        assert backend.run("print(1)").ok
    finally:
        backend.close()


@pytest.mark.parametrize("attack", ["os.kill(os.getppid(), signal.SIGKILL)", "os.kill(os.getppid(), signal.SIGSTOP)"])
def test_a_job_that_attacks_its_zygote_fails_itself_not_the_infrastructure(single, attack):
    # The zygote shares the job's uid; a job that kills or stops it must not turn its own failure
    # into an infrastructure error (those are kept out of the loss, so the policy would learn it).
    started = time.monotonic()
    result = single.run(f"import os, signal\n{attack}\nprint('done')", timeout=2)
    assert time.monotonic() - started < 15
    assert result.sandbox_error is None and not result.ok, result
    after = single.run("print(6 * 7)")
    assert after.ok and after.stdout == "42\n", after


def test_the_wipe_empties_a_deep_locked_tree_by_relative_names(tmp_path):
    # 3000 levels make a path far beyond PATH_MAX and beyond Python's recursion limit.
    code = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.path.abspath("sandbox")!r})
        import worker
        root = {str(tmp_path / "root")!r}
        os.makedirs(root)
        os.chdir(root)
        for i in range(200):
            open(f"f{{i}}", "w").close()
            os.symlink("/", f"l{{i}}")
        for _ in range(3000):
            os.mkdir("d")
            os.chdir("d")
            open("x", "w").close()
        os.chdir(root)
        os.chmod("d", 0)
        print(worker.wipe(root, time.monotonic() + 60), os.listdir(root))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout == "True []\n", result.stderr[-2000:]


def test_waiting_for_a_busy_pool_is_bounded():
    from agentrl.sandbox.base import SandboxUnavailable

    backend = get_backend("bwrap", pool_size=1)
    backend.worker_wait_s = 0.5  # the default (120 s) is for real queues
    try:
        busy = threading.Thread(target=lambda: backend.run("import time; time.sleep(3)", timeout=5))
        busy.start()
        time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(SandboxUnavailable, match="no sandbox worker became free"):
            backend.run("print(1)")
        assert time.monotonic() - started < 3
        busy.join()
        assert backend.run("print(1)").ok
    finally:
        backend.close()


def test_the_interpreters_installed_packages_are_hidden(single):
    # Site-packages may hold package data (a dataset's gold answers); only the listed packages are bound.
    from agentrl.sandbox.bwrap import site_packages

    hidden = [path for path in site_packages(single.interpreter) if os.path.isdir(path) and os.listdir(path)]
    if not hidden:
        pytest.skip("the sandbox interpreter has no installed packages here")
    code = f"import os\nfor path in {hidden!r}:\n    print(os.listdir(path))\nimport numpy\nprint(numpy.arange(3).sum())"
    result = single.run(code)
    assert result.ok and result.stdout == "[]\n" * len(hidden) + "3\n", result
    assert single.run(f"open({hidden[0] + '/x'!r}, 'w')").return_code != 0  # and they are read-only
