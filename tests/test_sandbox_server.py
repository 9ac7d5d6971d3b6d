"""The sandbox server speaks SandboxFusion's /run_code and pushes back under a burst; the python
tool works with the <python> tag and JSON tool calls, in-process and through the server."""

import asyncio
import base64
import json
import shutil

import httpx
import pytest
from agentrl.sandbox.base import get_backend
from agentrl.sandbox.server import create_app

from agentrl.executor import ToolExecutor
from agentrl.parsing import ActionParser
from tests.helpers.servers import serve_app

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture(scope="module")
def server():
    app = create_app(get_backend("bwrap", pool_size=2), workers=2, queue=2)
    with serve_app(app) as url:
        yield url


def test_run_code_success_in_sandboxfusion_format(server):
    payload = {"code": "import sys\nprint(sys.stdin.read() + open('in.txt').read())", "language": "python",
               "run_timeout": 5, "memory_limit_MB": 256, "stdin": "a", "files": {"in.txt": base64.b64encode(b"b").decode()}}
    body = httpx.post(f"{server}/run_code", json=payload, timeout=30).json()
    assert body["status"] == "Success" and body["compile_result"] is None and body["files"] == {}
    run = body["run_result"]
    assert run["status"] == "Finished" and run["return_code"] == 0 and run["stdout"] == "ab\n" and run["stderr"] == ""
    assert isinstance(run["execution_time"], float)


def test_failures_and_timeouts(server):
    failed = httpx.post(f"{server}/run_code", json={"code": "raise ValueError('bad')", "language": "python"}, timeout=30).json()
    # As in SandboxFusion: the program ran to its end ("Finished"), with a non-zero exit code.
    assert failed["status"] == "Failed" and failed["run_result"]["status"] == "Finished"
    assert failed["run_result"]["return_code"] == 1 and "ValueError: bad" in failed["run_result"]["stderr"]
    slow = httpx.post(f"{server}/run_code", json={"code": "while True: pass", "run_timeout": 1}, timeout=30).json()
    assert slow["status"] == "Failed" and slow["run_result"]["status"] == "TimeLimitExceeded"
    other = httpx.post(f"{server}/run_code", json={"code": "int main(){}", "language": "cpp"}, timeout=30).json()
    assert other["status"] == "SandboxError" and "not supported" in other["message"]


def test_verl_sandbox_fusion_client_payload_is_understood(server):
    # The exact request verl's sandbox_fusion client sends (requests.post with data=json.dumps(...)),
    # and the fields its check_correctness reads back.
    payload = {"compile_timeout": 10, "run_timeout": 10, "code": "print(int(input()) * 2)", "stdin": "21",
               "language": "python", "files": {}, "fetch_files": []}
    response = httpx.post(f"{server}/run_code", content=json.dumps(payload), timeout=30,
                          headers={"Content-Type": "application/json", "Accept": "application/json"})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "Success" and body["compile_result"] is None
    run = body["run_result"]
    assert (run["status"], run["stdout"], run["stderr"], run["return_code"]) == ("Finished", "42\n", "", 0)
    assert run["execution_time"] > 0
    unlimited = httpx.post(f"{server}/run_code", json={"code": "print('ok')", "memory_limit_MB": -1}, timeout=30)
    assert unlimited.json()["run_result"]["stdout"] == "ok\n"  # SandboxFusion's -1: the server's default


def test_bearer_token_guards_run_code_but_not_health():
    app = create_app(get_backend("process", pool_size=1), workers=1, queue=1, token="s3cret")
    with serve_app(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.post(f"{url}/run_code", json={"code": "print(1)"}, timeout=30).status_code == 401
        wrong = httpx.post(f"{url}/run_code", json={"code": "print(1)"}, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401
        right = httpx.post(f"{url}/run_code", json={"code": "print(1)"}, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert right.json()["run_result"]["stdout"] == "1\n"
        huge = httpx.post(f"{url}/run_code", json={"code": "#" * (17 * 1024 * 1024)}, headers={"Authorization": "Bearer s3cret"},
                          timeout=30)
        assert huge.status_code == 413
        (result,) = run_turn("<python>print(7 * 6)</python>", {"server_url": url, "token": "s3cret"})
        assert result.observation.text == "42"
        (refused,) = run_turn("<python>print(1)</python>", {"server_url": url, "token": "wrong"})
        assert refused.status == "infra_error" and "401" in refused.error


def test_burst_gets_429_instead_of_unbounded_queueing(server):
    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            requests = [client.post(f"{server}/run_code", json={"code": "import time; time.sleep(0.5)", "run_timeout": 5})
                        for _ in range(12)]
            return await asyncio.gather(*requests)

    codes = [r.status_code for r in asyncio.run(burst())]
    assert codes.count(200) >= 4 and codes.count(429) >= 4  # 2 running + 2 queued admitted at a time
    assert set(codes) <= {200, 429}
    metrics = httpx.get(f"{server}/metrics").text
    assert "agentrl_sandbox_rejected_total" in metrics
    assert httpx.post(f"{server}/run_code", json={"code": "print(1)"}, timeout=30).json()["status"] == "Success"


def run_turn(text, options, fmt="xml"):
    async def main():
        executor = ToolExecutor(["python"], {"python": options})
        parser = ActionParser(fmt, {"python": "python"} if fmt == "xml" else None, "answer",
                              {"python": executor.tool_classes["python"].schema()})
        parsed = parser.parse(text)
        async with executor.session("t") as session:
            return [await session.run([call]) for call in parsed.calls]

    return [r[0] for r in asyncio.run(main())]


def test_python_tool_with_tags_and_sessions():
    results = run_turn("<python>x = 20</python> then <python>print(x + 22)</python>", {"session": True})
    assert results[1].observation.text == "42"
    fresh = run_turn("<python>x = 20</python> <python>print(x)</python>", {})
    assert "NameError" in fresh[1].observation.text  # without a session every call starts clean


def test_python_tool_with_json_calls_through_the_server(server):
    text = '<tool_call>{"name": "python", "arguments": {"code": "print(sum(range(10)))"}}</tool_call>'
    (result,) = run_turn(text, {"server_url": server}, fmt="json")
    assert result.status == "ok" and result.observation.text == "45"


def test_memory_limits_granted_at_once_stay_within_the_budget():
    app = create_app(get_backend("bwrap", pool_size=2), workers=4, queue=4, memory_budget_mb=1024)
    with serve_app(app) as url:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                requests = [client.post(f"{url}/run_code", json={"code": "import time; time.sleep(1.5)", "run_timeout": 10,
                                                                 "memory_limit_MB": 512}) for _ in range(4)]
                return await asyncio.gather(*requests)

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 429, 429], codes  # 2 x 512 MB fill the 1024 MB budget
        refused = next(r for r in responses if r.status_code == 429)
        assert "memory" in refused.json()["message"] and refused.headers["Retry-After"]
        after = httpx.post(f"{url}/run_code", json={"code": "print(1)", "memory_limit_MB": 1024}, timeout=30)
        assert after.json()["run_result"]["stdout"] == "1\n"  # the grants were given back


def test_memory_limit_above_the_cap_is_refused_naming_the_cap():
    app = create_app(get_backend("bwrap", pool_size=1), workers=1, queue=1, memory_budget_mb=8192, max_memory_mb=2048)
    with serve_app(app) as url:
        refused = httpx.post(f"{url}/run_code", json={"code": "print(1)", "memory_limit_MB": 16384}, timeout=30)
        assert refused.status_code == 422 and "2048" in refused.json()["message"]
        assert httpx.post(f"{url}/run_code", json={"code": "print(1)", "memory_limit_MB": 2048}, timeout=30).status_code == 200


def test_bash_and_the_other_installed_languages(server):
    bash = httpx.post(f"{server}/run_code", json={"code": "read x; echo $((x * 2)) $(cat in.txt)", "language": "bash",
                                                  "stdin": "21\n", "files": {"in.txt": base64.b64encode(b"ok").decode()}},
                      timeout=30).json()
    assert bash["status"] == "Success" and bash["run_result"]["stdout"] == "42 ok\n", bash
    failed = httpx.post(f"{server}/run_code", json={"code": "exit 3", "language": "bash"}, timeout=30).json()
    assert failed["status"] == "Failed" and failed["run_result"]["return_code"] == 3
    if shutil.which("node"):
        node = httpx.post(f"{server}/run_code", json={"code": "console.log(6 * 7)", "language": "nodejs"}, timeout=60).json()
        assert node["run_result"]["stdout"] == "42\n", node
    refused = httpx.post(f"{server}/run_code", json={"code": "x", "language": "cobol"}, timeout=30).json()
    assert refused["status"] == "SandboxError" and "python" in refused["message"] and "bash" in refused["message"]


def test_fetch_files_returns_the_requested_files_within_a_bound(server):
    code = ("open('out.txt', 'w').write('result')\nimport os\nos.makedirs('d')\nopen('d/big', 'wb').write(b'x' * (20 << 20))\n"
            "os.mkfifo('fifo')\nos.symlink('/dev/zero', 'zero')")
    body = httpx.post(f"{server}/run_code", json={"code": code, "fetch_files": ["out.txt", "missing.txt", "../etc/x", "d/big",
                                                                              "fifo", "zero"]}, timeout=60).json()
    assert body["status"] == "Success", body
    assert body["files"] == {"out.txt": base64.b64encode(b"result").decode()}
    for name in ("missing.txt", "../etc/x", "d/big", "fifo", "zero"):
        assert name in body["message"]  # each file not returned is named, with the reason
    assert "limit" in body["message"]
