"""The bubblewrap sandbox under attack. Each case asserts containment, a clear result, a healthy
host, a working next execution, and no processes left behind."""

import os
import platform
import shutil
import socket
import textwrap
import threading
import time

import psutil
import pytest
from agentrl.sandbox.base import RunResult, SandboxUnavailable, get_backend

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

SECRET = "agentrl-test-secret-value"


# Sandboxes this test process already ran before the module's backend started (another test's
# shared backend, still warm): theirs, not the backend under test.
FOREIGN: set[int] = set()


@pytest.fixture(scope="module")
def sandbox():
    os.environ["AGENTRL_TEST_SECRET"] = SECRET
    FOREIGN.update(sandbox_processes())
    backend = get_backend("bwrap", pool_size=2)
    yield backend
    backend.close()


def sandbox_processes() -> set[int]:
    """This test process's sandbox processes: each bwrap it started and everything inside, whatever
    the uid (other checkouts' sandboxes on a shared machine are not ours)."""
    found = set()
    for child in psutil.Process().children():
        if child.pid in FOREIGN:
            continue
        try:
            if "bwrap" in " ".join(child.cmdline()):
                found |= {child.pid} | {p.pid for p in child.children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    return found


def leftover_processes(baseline: set[int]) -> list[int]:
    """Sandbox processes beyond the warm workers, each of which is bwrap (in the baseline), the
    supervisor it runs as the namespace's pid 1 and that supervisor's first child, the zygote:
    anything else inside a sandbox, and any other sandbox process, is left over."""
    leftovers, known = [], set(baseline)
    for pid in baseline:
        try:
            for init in psutil.Process(pid).children():
                known.add(init.pid)
                children = sorted(init.children(), key=lambda p: p.create_time())
                if children:
                    known.add(children[0].pid)
                for other in children:
                    leftovers += [p.pid for p in other.children(recursive=True)]
                leftovers += [p.pid for p in children[1:]]
        except psutil.NoSuchProcess:
            continue
    return leftovers + sorted(sandbox_processes() - known - set(leftovers))


def assert_healthy(sandbox, baseline: set[int]) -> None:
    """The next execution works, and only the warm workers (the baseline) are left."""
    result = sandbox.run("print(6 * 7)")
    assert result.ok and result.stdout == "42\n", result
    deadline = time.monotonic() + 5
    while leftover_processes(baseline) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leftover_processes(baseline), "processes were left behind"


@pytest.fixture()
def baseline(sandbox):
    """The warm workers' bwrap processes (their zygotes and spares are checked by structure)."""
    sandbox.run("pass")
    return {worker.process.pid for worker in list(sandbox._idle.queue)}


def test_fork_bomb_is_contained(sandbox, baseline):
    result = sandbox.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", timeout=3)
    assert result.timed_out or result.return_code != 0
    assert psutil.cpu_count() and len(psutil.pids()) < 5000
    assert_healthy(sandbox, baseline)


def test_memory_bomb_is_contained(sandbox, baseline):
    result = sandbox.run("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert result.memory_exceeded and "allocated" not in result.stdout
    assert "MemoryError" in result.for_model() or "memory" in result.for_model()
    assert_healthy(sandbox, baseline)


def test_infinite_loop_times_out(sandbox, baseline):
    started = time.monotonic()
    result = sandbox.run("while True:\n    pass", timeout=1)
    assert result.timed_out and time.monotonic() - started < 4
    assert "time limit" in result.for_model()
    assert_healthy(sandbox, baseline)


def test_sleeping_past_the_timeout_is_stopped(sandbox, baseline):
    result = sandbox.run("import time\nprint('start', flush=True)\ntime.sleep(60)", timeout=1)
    assert result.timed_out and result.stdout == "start\n"
    assert_healthy(sandbox, baseline)


def test_child_left_running_after_the_parent_exits_is_killed(sandbox, baseline):
    code = ("import os, time\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(300)\n    os._exit(0)\n"
            "print('parent done')")
    result = sandbox.run(code)
    assert result.ok and result.stdout == "parent done\n"
    assert_healthy(sandbox, baseline)


def test_only_loopback_interface_exists(sandbox, baseline):
    result = sandbox.run("print(open('/proc/net/dev').read())")
    interfaces = [line.split(":")[0].strip() for line in result.stdout.splitlines()[2:] if ":" in line]
    assert interfaces == ["lo"]
    assert_healthy(sandbox, baseline)


def test_host_loopback_listener_is_unreachable(sandbox, baseline):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    accepted = []
    listener.settimeout(3)
    thread = threading.Thread(target=lambda: accepted.append(_accept(listener)), daemon=True)
    thread.start()
    code = ("import socket\ns = socket.socket()\ns.settimeout(2)\n"
            f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('connected')\nexcept OSError as e:\n    print('refused', e)")
    result = sandbox.run(code)
    thread.join()
    listener.close()
    assert "refused" in result.stdout and accepted == [None]
    assert_healthy(sandbox, baseline)


def _accept(listener):
    try:
        connection, _ = listener.accept()
        connection.close()
        return "accepted"
    except OSError:
        return None


def test_host_environment_does_not_leak(sandbox, baseline):
    result = sandbox.run("import os\nprint(dict(os.environ))")
    assert SECRET not in result.stdout and "AGENTRL_TEST_SECRET" not in result.stdout
    assert_healthy(sandbox, baseline)


@pytest.mark.parametrize("path", [os.path.abspath("agentrl/config.py"), "/root", "/etc/shadow", "/etc/passwd", "/work"])
def test_host_files_are_not_readable(sandbox, baseline, path):
    result = sandbox.run(f"import os\nprint(os.path.exists({path!r}))\nprint(open({path!r}).read()[:20])")
    assert result.stdout.startswith("False") and result.return_code != 0
    assert_healthy(sandbox, baseline)


@pytest.mark.parametrize("path", ["/usr/evil", "/evil", "/dev/evil", "/proc/evil"])
def test_writing_outside_the_work_directory_fails(sandbox, baseline, path):
    result = sandbox.run(f"open({path!r}, 'w').write('x')")
    assert result.return_code != 0 and any(word in result.stderr for word in ("Read-only", "Permission", "No such file"))
    assert not os.path.exists(path)
    assert_healthy(sandbox, baseline)


def test_the_zygote_is_out_of_reach_of_jobs(sandbox, baseline):
    # Writing the zygote's memory or its reply pipe would plant state for the next trajectory.
    code = textwrap.dedent("""
        import os
        for path, mode in (('/proc/1/mem', 'r+b'), ('/proc/1/fd/1', 'w'), ('/proc/1/environ', 'rb')):
            try:
                open(path, mode)
                print('opened', path)
            except OSError as e:
                print('denied', e.errno)
        os.kill(1, 9)
        print('init survives')
    """)
    result = sandbox.run(code)
    assert "opened" not in result.stdout and result.stdout.count("denied") == 3 and "init survives" in result.stdout
    assert_healthy(sandbox, baseline)


def test_ipc_objects_and_shared_memory_do_not_outlive_the_execution(sandbox, baseline):
    plant = textwrap.dedent("""
        import ctypes
        libc = ctypes.CDLL(None)
        print(libc.shmget(4242, 4096, 0o1666) >= 0, libc.semget(4243, 1, 0o1666) >= 0, libc.msgget(4244, 0o1666) >= 0)
        open('/dev/shm/note', 'w').write('secret')
    """)
    assert sandbox.run(plant).stdout == "True True True\n"
    look = textwrap.dedent("""
        import os
        counts = [len(open(f'/proc/sysvipc/{kind}').read().splitlines()) - 1 for kind in ('shm', 'sem', 'msg')]
        print(os.listdir('/dev/shm'), counts)
    """)
    for _ in range(sandbox.pool_size):  # whichever warm worker ran the first job
        assert sandbox.run(look).stdout == "[] [0, 0, 0]\n"
    queue = sandbox.run("import ctypes\nprint(ctypes.CDLL(None).mq_open(b'/leak', 0o100 | 0o2, 0o600, None))")
    assert queue.stdout == "-1\n"  # POSIX message queues are refused (RLIMIT_MSGQUEUE = 0)
    assert_healthy(sandbox, baseline)


def test_keyrings_and_nested_user_namespaces_are_refused(sandbox, baseline):
    # Kernel keyrings belong to the host uid and would outlive the job; a nested user namespace
    # could mount a tmpfs without a size limit.
    add_key = {"x86_64": 248, "aarch64": 217}[platform.machine()]
    code = textwrap.dedent(f"""
        import ctypes
        libc = ctypes.CDLL(None)
        print(libc.syscall({add_key}, b'user', b'leak', b'secret', 6, -4), libc.unshare(0x10000000))
    """)
    result = sandbox.run(code)
    assert result.stdout == "-1 -1\n"
    assert_healthy(sandbox, baseline)


def test_filling_the_work_directory_is_bounded(sandbox, baseline):
    code = "data = b'x' * (1 << 20)\nwith open('big', 'wb') as f:\n    for _ in range(1024):\n        f.write(data)"
    result = sandbox.run(code, timeout=10)
    assert result.return_code != 0 and ("No space" in result.stderr or "File too large" in result.stderr or result.return_code < 0)
    assert_healthy(sandbox, baseline)
    leftover = sandbox.run("import os\nprint(os.listdir('.'))")
    assert leftover.stdout == "[]\n"  # every execution starts in an empty work directory


def test_gigabytes_of_stdout_are_capped_with_a_marker(sandbox, baseline):
    code = "import sys\nchunk = 'y' * (1 << 20)\nfor _ in range(2048):\n    sys.stdout.write(chunk)"
    result = sandbox.run(code, timeout=20)
    assert len(result.stdout) < 100_000 and "output truncated" in result.stdout
    assert_healthy(sandbox, baseline)


def test_other_processes_cannot_be_signalled_or_traced(sandbox, baseline):
    host_pid = os.getpid()
    code = ("import os, ctypes\n"
            f"try:\n    os.kill({host_pid}, 9)\n    print('killed host')\nexcept OSError as e:\n    print('kill failed', e.errno)\n"
            "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
            "libc = ctypes.CDLL(None)\nprint('ptrace', libc.ptrace(16, 1, 0, 0))")
    result = sandbox.run(code)
    assert "kill failed" in result.stdout and psutil.pid_exists(host_pid)
    visible = eval(result.stdout.splitlines()[1])
    assert len(visible) <= 4  # bwrap's init, the worker, the job: nothing of the host
    assert "ptrace -1" in result.stdout
    assert_healthy(sandbox, baseline)


def test_no_state_leaks_between_executions(sandbox):
    first = sandbox.run("import builtins\nbuiltins.leak = 'secret'\nopen('note', 'w').write('x')\nprint('set')")
    second = sandbox.run("import builtins, os\nprint(getattr(builtins, 'leak', 'clean'), os.listdir('.'))")
    assert first.ok and second.stdout == "clean []\n"


def test_stdin_files_and_numpy(sandbox):
    result = sandbox.run("import numpy as np, sys\nprint(sys.stdin.read().upper(), open('data.txt').read(), np.arange(4).sum())",
                         stdin="hello", files={"data.txt": b"file!"})
    assert result.stdout == "HELLO file! 6\n"


def test_errors_for_the_model_are_short(sandbox):
    code = "def f(n):\n    return f(n + 1)\nf(0)"
    result = sandbox.run(code)
    message = result.for_model()
    assert "RecursionError" in message and len(message.splitlines()) <= 8


def test_sessions_keep_state_within_a_trajectory_not_across(sandbox):
    first, second = sandbox.session(), sandbox.session()
    try:
        assert first.run("counter = 41").ok
        assert first.run("counter += 1\nprint(counter)").stdout == "42\n"
        leaked = second.run("print(globals().get('counter', 'absent'))")
        assert leaked.stdout == "absent\n"
        timed = first.run("while True: pass", timeout=0.5)
        assert timed.timed_out
        assert first.run("print(globals().get('counter', 'reset'))").stdout == "reset\n"
    finally:
        first.close()
        second.close()


def test_missing_backend_refuses_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        get_backend("bwrap")
    with pytest.raises(SandboxUnavailable, match="unknown sandbox backend"):
        get_backend("firejail")


def test_docker_backend_refuses_without_an_engine():
    try:
        import docker

        docker.from_env().ping()
        pytest.skip("a Docker engine is reachable here; the docker tests cover it")
    except Exception:
        pass
    with pytest.raises(SandboxUnavailable, match="[Dd]ocker"):
        get_backend("docker")


def test_result_summary_for_the_model():
    assert RunResult(stdout="3\n", return_code=0).for_model() == "3"
    assert RunResult(return_code=0).for_model() == "(no output)"


def test_workers_outlive_the_thread_that_started_them():
    # bubblewrap's --die-with-parent follows the starting *thread*; asyncio.to_thread's threads come and go.
    created = []
    thread = threading.Thread(target=lambda: created.append(get_backend("bwrap", pool_size=1)))
    thread.start()
    thread.join()
    backend = created[0]
    try:
        time.sleep(0.2)
        assert backend.run("print('alive')").stdout == "alive\n"
    finally:
        backend.close()


def test_idle_sessions_expire_and_say_so():
    backend = get_backend("bwrap", pool_size=1, session_ttl_s=0.4)
    session = backend.session()
    try:
        assert session.run("kept = 1").ok
        first_uid_processes = sandbox_processes()
        deadline = time.monotonic() + 5
        while session.worker is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session.worker is None  # the reaper stopped the idle sandbox
        assert sandbox_processes() < first_uid_processes
        result = session.run("print(globals().get('kept', 'gone'))")
        assert "idle" in result.stdout and result.stdout.endswith("gone\n")
    finally:
        backend.close()


def test_session_memory_and_output_limits(sandbox):
    session = sandbox.session(memory_mb=256)
    try:
        assert session.run("x = 5").ok
        bomb = session.run("y = bytearray(2 * 1024 ** 3)")
        assert bomb.memory_exceeded and "MemoryError" in bomb.for_model()
        flood = session.run("print('z' * (10 * 1024 * 1024))")
        assert len(flood.stdout) < 100_000 and "output truncated" in flood.stdout
    finally:
        session.close()


def test_a_locked_work_directory_is_still_wiped(sandbox, baseline):
    lock = ("import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nos.chmod('a/b', 0)\nos.chmod('a', 0)\n"
            "os.chmod('.', 0o500)\nopen('/dev/shm/s', 'w').write('x')\nos.chmod('/dev/shm', 0)\nos.chmod('/tmp', 0)")
    assert sandbox.run(lock).ok
    for _ in range(sandbox.pool_size):
        result = sandbox.run("import os\nopen('new', 'w').write('ok')\nprint(os.listdir('.'), os.listdir('/dev/shm'))")
        assert result.stdout == "['new'] []\n", result
    assert_healthy(sandbox, baseline)


def test_an_install_the_sandbox_uid_cannot_reach_is_refused_with_the_reason(tmp_path, monkeypatch):
    import agentrl.sandbox.bwrap as bwrap

    private = tmp_path / "private"
    (private / "privatepkg").mkdir(parents=True)
    (private / "privatepkg" / "__init__.py").write_text("")
    private.chmod(0o700)
    monkeypatch.syspath_prepend(str(private))
    with pytest.raises(SandboxUnavailable, match="cannot reach .*private/privatepkg.*chmod o\\+x"):
        bwrap.BwrapBackend(pool_size=1, packages=("numpy", "privatepkg"))
