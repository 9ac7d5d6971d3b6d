"""The tool server over 127.0.0.1: batch calls, sticky sessions (one namespace per run), auth,
limits, and a client that survives a killed and restarted server (a trajectory whose session died
with it is an infra error)."""

import asyncio
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from agentrl.executor import ToolExecutor
from agentrl.parsing import ToolCall
from tests.helpers.servers import free_port, start_cli_server

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("tests.helpers.demo_tools:Counter,tests.helpers.demo_tools:Pid,tests.helpers.demo_tools:Failing,tests.helpers.demo_tools:NoOp,"
         "tests.helpers.demo_tools:ContextEcho,sql")


def start_server(port: int, *extra: str) -> subprocess.Popen:
    return start_cli_server(["serve", "tools", "--tools", TOOLS, *extra], port,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture()
def server(tmp_path):
    port = free_port()
    (tmp_path / "databases").mkdir()
    process = start_server(port, "--token", "s3cret", "--idle-ttl", "1", "--database-root", str(tmp_path / "databases"))
    yield f"http://127.0.0.1:{port}", port
    process.kill()
    process.wait()


def test_round_trip_with_sticky_sessions(server):
    url, _ = server

    async def main():
        executor = ToolExecutor(TOOLS.split(","), server_url=url, token="s3cret")
        a, b = executor.session("a"), executor.session("b")
        results = [await a.run([ToolCall("counter", {})]), await a.run([ToolCall("counter", {"step": 5})]),
                   await b.run([ToolCall("counter", {})])]
        errors = await a.run([ToolCall("failing", {"mode": "tool_error"}), ToolCall("failing", {"mode": "hang"}),
                              ToolCall("failing", {"mode": "infra"})])
        await a.close()
        await b.close()
        await executor.close()
        return [r[0].observation.text for r in results], [(r.status, r.observation.text) for r in errors]

    texts, errors = asyncio.run(main())
    assert texts == ["a:1", "a:6", "b:1"]
    assert errors[0] == ("error", "Error: the file does not exist")
    assert errors[1][0] == "timeout" and errors[2][0] == "infra_error"


def test_task_metadata_and_images_reach_the_served_tools(server, tmp_path):
    from PIL import Image

    from agentrl.client import encode_image
    from agentrl.tool import ToolContext

    url, _ = server
    db_path = tmp_path / "databases" / "tiny.sqlite"
    outside = tmp_path / "outside.sqlite"
    for path in (db_path, outside):
        connection = sqlite3.connect(path)
        connection.executescript("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (7), (8);")
        connection.commit()
        connection.close()
    images = [Image.new("RGB", (12, 5), "red"), Image.new("L", (3, 4))]

    async def main():
        executor = ToolExecutor(TOOLS.split(","), server_url=url, token="s3cret")
        async with executor.session("m", ToolContext("m", {"db_path": db_path}, images)) as session:
            results = await session.run([ToolCall("context_echo", {}), ToolCall("sql", {"query": "SELECT sum(x) FROM t"})])
        async with executor.session("o", ToolContext("o", {"db_path": outside})) as session:
            (refused,) = await session.run([ToolCall("sql", {"query": "SELECT sum(x) FROM t"})])
        await executor.close()
        return results + [refused]

    echo, sql, refused = asyncio.run(main())
    assert echo.observation.text == f"db_path={db_path} images=['12x5', '3x4']"
    assert sql.status == "ok" and "15" in sql.observation.text
    # the server opens only databases under its --database-root, whatever path a client names
    assert refused.status == "error" and "outside the allowed database roots" in refused.error
    bad = {"requests": [{"trajectory_id": "bad", "tool": "context_echo", "images": ["not an image"]}]}
    response = httpx.post(f"{url}/call", json=bad, headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 422 and "images" in response.text
    bomb = Image.new("1", (5000, 5000))  # 25 Mpixel, a few kB as PNG
    bad["requests"][0]["images"] = [encode_image(bomb)]
    response = httpx.post(f"{url}/call", json=bad, headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 422 and "pixel limit" in response.text


def test_two_runs_sharing_a_server_never_reach_each_others_sessions(server):
    url, _ = server
    headers = {"Authorization": "Bearer s3cret"}

    async def main():
        first = ToolExecutor(TOOLS.split(","), server_url=url, token="s3cret")
        second = ToolExecutor(TOOLS.split(","), server_url=url, token="s3cret")
        mine, theirs = first.session("task-0/0"), second.session("task-0/0")  # the same trajectory id
        texts = []
        for session in (mine, mine, theirs, mine, theirs):
            (result,) = await session.run([ToolCall("counter", {})])
            texts.append(result.observation.text)
        namespaces = (first._client.namespace, second._client.namespace)
        # a client without the namespace (here: none at all) cannot continue or release either session
        outsider = [httpx.post(f"{url}/call", headers=headers, json={"requests": [
            {"trajectory_id": "task-0/0", "tool": "counter", "resume": True, "namespace": namespace}]}).json()
            for namespace in ("", "0" * 32)]
        released = httpx.post(f"{url}/release", json={"trajectory_id": "task-0/0"}, headers=headers).json()
        public = httpx.get(f"{url}/health").text + httpx.get(f"{url}/metrics").text
        await mine.close()  # one run ending its trajectory leaves the other's alone
        (after,) = await theirs.run([ToolCall("counter", {})])
        await theirs.close()
        await first.close()
        await second.close()
        return texts, namespaces, outsider, released, public, after.observation.text

    texts, namespaces, outsider, released, public, after = asyncio.run(main())
    assert texts == ["task-0/0:1", "task-0/0:2", "task-0/0:1", "task-0/0:3", "task-0/0:2"]
    assert namespaces[0] != namespaces[1] and len(namespaces[0]) == 32
    assert [answer["results"][0]["status"] for answer in outsider] == ["session_restarted"] * 2
    assert released == {"released": False}
    assert not any(namespace in public for namespace in namespaces)
    assert after == "task-0/0:3"


def test_batch_endpoint_answers_in_order_and_exposes_metrics(server):
    url, _ = server
    headers = {"Authorization": "Bearer s3cret"}
    payload = {"requests": [{"trajectory_id": f"t{i % 3}", "tool": "counter", "arguments": {}} for i in range(9)]}
    response = httpx.post(f"{url}/call", json=payload, headers=headers, timeout=10)
    assert response.status_code == 200
    texts = sorted(r["text"] for r in response.json()["results"])
    assert texts == sorted(f"t{t}:{n}" for t in range(3) for n in (1, 2, 3))
    metrics = httpx.get(f"{url}/metrics").text
    assert 'agentrl_tool_calls_total{status="ok",tool="counter"} 9.0' in metrics
    assert "agentrl_tool_sessions 3.0" in metrics
    time.sleep(1.8)  # idle TTL is 1 s: the sessions are evicted
    assert httpx.get(f"{url}/health").json()["sessions"] == 0


def test_release_drops_the_trajectory_state(server):
    url, _ = server
    headers = {"Authorization": "Bearer s3cret"}
    call = {"requests": [{"trajectory_id": "r", "tool": "counter", "arguments": {}}]}
    assert httpx.post(f"{url}/call", json=call, headers=headers).json()["results"][0]["text"] == "r:1"
    assert httpx.post(f"{url}/release", json={"trajectory_id": "r"}, headers=headers).json() == {"released": True}
    assert httpx.post(f"{url}/call", json=call, headers=headers).json()["results"][0]["text"] == "r:1"


def test_token_is_required_and_bodies_are_limited(server):
    url, _ = server
    call = {"requests": [{"trajectory_id": "x", "tool": "counter", "arguments": {}}]}
    assert httpx.post(f"{url}/call", json=call).status_code == 401
    assert httpx.post(f"{url}/call", json=call, headers={"Authorization": "Bearer wrong"}).status_code == 401
    huge = {"requests": [{"trajectory_id": "x", "tool": "counter", "arguments": {"pad": "x" * 5_000_000}}]}
    assert httpx.post(f"{url}/call", json=huge, headers={"Authorization": "Bearer s3cret"}).status_code == 413
    assert httpx.post(f"{url}/call", json={"requests": []}, headers={"Authorization": "Bearer s3cret"}).status_code == 422


def test_server_binds_loopback_by_default(server):
    _, port = server
    out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout if _has("ss") else ""
    if out:
        assert f"127.0.0.1:{port}" in out and f"0.0.0.0:{port}" not in out


def _has(command: str) -> bool:
    return subprocess.run(["which", command], capture_output=True).returncode == 0


def test_client_survives_a_killed_and_restarted_server():
    port = free_port()
    process = start_server(port)
    url = f"http://127.0.0.1:{port}"

    async def main():
        nonlocal process
        executor = ToolExecutor(TOOLS.split(","), server_url=url)
        session = executor.session("k")
        before = await session.run([ToolCall("pid", {})])
        process.send_signal(signal.SIGKILL)
        process.wait()

        async def restart_later():
            await asyncio.sleep(1.0)
            return await asyncio.to_thread(start_server, port)

        restarter = asyncio.create_task(restart_later())
        fresh = [executor.session(f"new-{i}") for i in range(5)]
        during = await asyncio.gather(*(s.run([ToolCall("pid", {})]) for s in fresh))
        process = await restarter
        lost = await session.run([ToolCall("pid", {})])
        await executor.close()
        return before[0], [r[0] for r in during], lost[0]

    try:
        before, during, lost = asyncio.run(main())
    finally:
        process.kill()
        process.wait()
    assert before.status == "ok"
    # calls made while the server was down wait for it and are answered by the new process
    assert all(r.status == "ok" for r in during), [(r.status, r.error) for r in during]
    assert {r.observation.text for r in during} != {before.observation.text}
    # the trajectory whose session died with the old process is an infrastructure failure, not a fresh start
    assert lost.status == "infra_error" and "restarted" in lost.error


def test_unreachable_server_is_an_infra_error():
    from agentrl.client import ToolServerClient

    async def main():
        executor = ToolExecutor(TOOLS.split(","), server_url=f"http://127.0.0.1:{free_port()}")
        executor._client = ToolServerClient(executor.server_url, attempts=3, max_wait_s=2)
        (result,) = await executor.session("z").run([ToolCall("pid", {})])
        await executor.close()
        return result

    result = asyncio.run(main())
    assert result.status == "infra_error" and "unreachable" in result.error


def test_a_trajectory_whose_session_the_server_lost_becomes_infra_error(tokenizer):
    from agentrl.config import RolloutConfig, ToolsConfig
    from agentrl.rollout import RolloutWorker
    from agentrl.server import create_app
    from tests.helpers.ping_env import PingEnv
    from tests.helpers.scripted import ScriptedEngine
    from tests.helpers.servers import serve_app

    app = create_app(["tests.helpers.ping_env:PingTool"])
    env = PingEnv()
    with serve_app(app) as url:
        def script(conversation):
            pongs = conversation.count("<pong>")
            if pongs == 1:  # the server restarts between two turns: the sessions it held are gone
                app.state.sessions.sessions.clear()
            return "<ping>hi</ping>" if pongs < 2 else "<answer>x</answer>"

        async def main():
            executor = ToolExecutor(list(env.tools), server_url=url)
            worker = RolloutWorker(ScriptedEngine(tokenizer, script), tokenizer, env, executor,
                                   RolloutConfig(max_turns=4), ToolsConfig())
            trajectory = await worker.run_trajectory(env.make_task(env.load("eval")[0], 0))
            await executor.close()
            return trajectory

        trajectory = asyncio.run(main())
    assert [call.status for call in trajectory.tool_calls] == ["ok", "infra_error"]
    assert trajectory.status == "infra_error" and not trajectory.trainable
    assert "restarted" in trajectory.metadata["error"]


def test_the_cli_server_bounds_the_calls_running_at_once():
    import asyncio

    import httpx

    port = free_port()
    process = start_cli_server(["serve", "tools", "--tools", "tests.helpers.demo_tools:Sleeper",
                                "--max-concurrent-calls", "1", "--max-queued-calls", "0"], port,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async def two_at_once():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                calls = [{"requests": [{"trajectory_id": f"t{i}", "tool": "sleeper", "arguments": {"seconds": 1.0}}]}
                         for i in range(2)]
                return await asyncio.gather(*(client.post("/call", json=call) for call in calls))

        codes = sorted(response.status_code for response in asyncio.run(two_at_once()))
    finally:
        process.kill()
        process.wait()
    assert codes == [200, 429]
