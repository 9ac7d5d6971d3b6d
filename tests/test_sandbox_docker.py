"""The docker backend's containment, where a Docker engine is reachable (skipped otherwise, with
the reason). The image is the backend's default, python:3.11-slim, pulled beforehand."""

import os

import pytest
from agentrl.sandbox.base import SandboxUnavailable, get_backend

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def sandbox():
    try:
        backend = get_backend("docker")
    except SandboxUnavailable as error:
        pytest.skip(f"docker backend unavailable here: {error}")
    yield backend
    backend.close()


def test_docker_runs_code_with_stdin_and_files(sandbox):
    result = sandbox.run("import sys\nprint(sys.stdin.read(), open('a.txt').read())", stdin="in", files={"a.txt": b"file"})
    assert result.ok and result.stdout == "in file\n"


def test_docker_takes_jobs_far_over_the_command_line_limit(sandbox):
    # the job travels on the container's stdin: argv would refuse anything over ~128 KiB (E2BIG)
    code = "DATA = '" + "c" * 300_000 + "'\nimport sys\nprint(len(DATA), len(sys.stdin.read()), len(open('big.bin', 'rb').read()))"
    result = sandbox.run(code, stdin="s" * 200_000, files={"big.bin": b"\0" * (1 << 20)})
    assert result.ok and result.stdout == f"300000 200000 {1 << 20}\n", result.stderr[-500:]


def test_docker_has_no_network_and_no_host_environment(sandbox):
    os.environ["AGENTRL_DOCKER_SECRET"] = "hidden-value"
    result = sandbox.run("import os\nprint(sorted(os.listdir('/sys/class/net')), 'hidden-value' in str(os.environ))")
    assert result.stdout == "['lo'] False\n"


def test_docker_root_is_read_only_and_user_unprivileged(sandbox):
    result = sandbox.run("import os\nprint(os.getuid())\nopen('/usr/evil', 'w')")
    assert result.stdout.startswith("65534") and result.return_code != 0 and "Read-only" in result.stderr


def test_docker_timeouts_memory_and_output_are_bounded(sandbox):
    assert sandbox.run("while True: pass", timeout=2).timed_out
    assert sandbox.run("x = bytearray(2 * 1024 ** 3)", memory_mb=128).memory_exceeded
    flood = sandbox.run("import sys\nfor _ in range(64):\n    sys.stdout.write('y' * (1 << 20))")
    assert len(flood.stdout) < 100_000 and "output truncated" in flood.stdout


def test_docker_fork_bomb_is_contained(sandbox):
    result = sandbox.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout=3)
    assert result.timed_out or result.return_code != 0
    assert sandbox.run("print('next')").stdout == "next\n"
