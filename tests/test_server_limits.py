"""The servers' edges against hostile or broken clients, all on 127.0.0.1: no non-loopback bind
without a token, auth before the body, 413 for any oversized body, 401 for any malformed header,
bounded sessions, batches, images, calls executing at once and retriever queues, idempotent retries
and lost sessions."""

import asyncio
import base64
import contextlib
import io
import threading
import time

import httpx
import pytest
import uvicorn
from PIL import Image
from typer.testing import CliRunner

from agentrl import Tool
from agentrl.cli import app as cli
from agentrl.client import ToolServerClient
from agentrl.retrieval.index import Index
from agentrl.retrieval.server import create_app as create_retriever
from agentrl.server import create_app as create_tool_server
from tests.helpers.servers import serve_app

COUNTER = "tests.helpers.demo_tools:Counter"
DOCUMENTS = [{"id": "1", "contents": "Volcano\nlava comes out of an erupting mountain"},
             {"id": "2", "contents": "Chess\na board game for two players"}]


class SlowCounter(Tool):
    """Count calls across the whole server, slowly (for retries that must not run twice)."""

    calls = 0
    lock = threading.Lock()

    def call(self, delay: float = 0.0) -> str:
        time.sleep(delay)
        with SlowCounter.lock:
            SlowCounter.calls += 1
            return str(SlowCounter.calls)


class Held(Tool):
    """Hold each call, recording how many are held at once across the server and how many ran."""

    timeout = 30.0
    running = most = total = 0
    lock = threading.Lock()

    def call(self, seconds: float = 0.5) -> str:
        with Held.lock:
            Held.running += 1
            Held.total += 1
            Held.most = max(Held.most, Held.running)
        try:
            time.sleep(seconds)
        finally:
            with Held.lock:
                Held.running -= 1
        return "held"


def png(width: int, height: int, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode()


def one_call(trajectory_id="t", tool="counter", **extra):
    return {"requests": [{"trajectory_id": trajectory_id, "tool": tool, "arguments": {}, **extra}]}


# -- binding -----------------------------------------------------------------------------------

@pytest.fixture()
def no_uvicorn(monkeypatch):
    """Record what would be served instead of binding anything."""
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(kwargs))
    monkeypatch.delenv("AGENTRL_SERVER_TOKEN", raising=False)
    return started


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("retriever")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(f'{{"id": "{d["id"]}", "contents": {d["contents"]!r}}}\n'.replace("'", '"')
                              for d in DOCUMENTS))
    return str(Index.build(corpus, root / "index"))


@pytest.mark.parametrize("service", ["tools", "retriever", "sandbox"])
def test_a_non_loopback_bind_without_a_token_is_refused(service, no_uvicorn, index_dir):
    extra = {"tools": ["--tools", COUNTER], "retriever": ["--index", index_dir],
             "sandbox": ["--backend", "process"]}[service]
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        result = CliRunner().invoke(cli, ["serve", service, *extra, "--host", host])
        assert result.exit_code == 2, (host, result.output)
        assert "without a bearer token" in result.output and "--insecure" in result.output
    assert no_uvicorn == []


@pytest.mark.parametrize("args", [["--host", "127.0.0.1"], ["--host", "::1"], ["--host", "0.0.0.0", "--token", "s"],
                                  ["--host", "0.0.0.0", "--insecure"]])
def test_loopback_a_token_or_insecure_may_start(args, no_uvicorn):
    result = CliRunner().invoke(cli, ["serve", "tools", "--tools", COUNTER, *args])
    assert result.exit_code == 0, result.output
    assert len(no_uvicorn) == 1 and no_uvicorn[0]["host"] == args[1]


# -- the HTTP edge of every server ---------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(index_dir):
    """The tool server, the retriever and the sandbox server, each with a token, on 127.0.0.1."""
    from agentrl.sandbox.base import get_backend
    from agentrl.sandbox.server import create_app as create_sandbox

    with contextlib.ExitStack() as stack:
        yield {
            "tools": (stack.enter_context(serve_app(create_tool_server([COUNTER], token="s3cret"))), "/call"),
            "retriever": (stack.enter_context(serve_app(create_retriever(Index.load(index_dir), token="s3cret",
                                                                         max_body_bytes=1 << 20))), "/retrieve"),
            "sandbox": (stack.enter_context(serve_app(create_sandbox(get_backend("process"), token="s3cret"))),
                        "/run_code"),
        }


@pytest.mark.parametrize("service", ["tools", "retriever", "sandbox"])
def test_an_oversized_chunked_body_gets_413(servers, service):
    url, path = servers[service]

    def chunks():
        yield b'{"queries": ["'
        for _ in range(40):
            yield b"x" * (512 * 1024)
        yield b'"]}'

    response = httpx.post(url + path, content=chunks(), headers={"Authorization": "Bearer s3cret"}, timeout=30)
    assert response.status_code == 413, response.text
    declared = httpx.post(url + path, content=b"x" * (17 << 20), headers={"Authorization": "Bearer s3cret"}, timeout=30)
    assert declared.status_code == 413


@pytest.mark.parametrize("service", ["tools", "retriever", "sandbox"])
@pytest.mark.parametrize("header", [b"Bearer s3cr\xc3\xa9t", b"\xff\xfe", b"Bearer", b"bearer s3cret", b"Basic czNjcmV0"])
def test_a_malformed_or_wrong_authorization_header_gets_401(servers, service, header):
    url, path = servers[service]
    response = httpx.post(url + path, content=b"{}", headers={"Authorization": header, "Content-Type": "application/json"})
    assert response.status_code == 401


@pytest.mark.parametrize("service", ["tools", "retriever", "sandbox"])
def test_the_token_is_checked_before_the_body_is_read(servers, service):
    url, path = servers[service]
    assert httpx.post(url + path, content=b"not json at all").status_code == 401
    assert httpx.get(url + "/health").status_code == 200


# -- tool server caps ----------------------------------------------------------------------------

@pytest.fixture()
def tool_server():
    SlowCounter.calls = 0
    app = create_tool_server([COUNTER, "tests.test_server_limits:SlowCounter"], max_sessions=2)
    with serve_app(app) as url:
        yield url


def test_batches_are_capped(tool_server):
    batch = {"requests": [{"trajectory_id": "b", "tool": "counter"}] * 257}
    response = httpx.post(tool_server + "/call", json=batch)
    assert response.status_code == 422


def test_live_sessions_are_capped_with_429(tool_server):
    for name in ("s1", "s2"):
        assert httpx.post(tool_server + "/call", json=one_call(name)).json()["results"][0]["status"] == "ok"
    refused = httpx.post(tool_server + "/call", json=one_call("s3"))
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    assert httpx.post(tool_server + "/call", json=one_call("s1")).json()["results"][0]["text"] == "s1:2"
    assert httpx.post(tool_server + "/release", json={"trajectory_id": "s2"}).json() == {"released": True}
    assert httpx.post(tool_server + "/call", json=one_call("s3")).json()["results"][0]["text"] == "s3:1"


def test_decoded_image_pixels_per_request_are_capped(tool_server):
    big = png(4000, 4000)  # 16 MP: allowed alone, ~40 KB compressed
    response = httpx.post(tool_server + "/call", json=one_call("img", images=[big] * 8))
    assert response.status_code == 413 and "pixels" in response.text
    assert httpx.post(tool_server + "/call", json=one_call("img", images=[big])).status_code == 200


@pytest.mark.parametrize("format", ["TIFF", "ICO", "PPM"])
def test_only_allowlisted_image_formats_are_decoded(tool_server, format):
    response = httpx.post(tool_server + "/call", json=one_call(f"fmt-{format}", images=[png(16, 16, format)]))
    assert response.status_code == 422 and "PNG, JPEG" in response.text


def test_unknown_tool_names_share_one_metric_label(tool_server):
    for i in range(3):
        httpx.post(tool_server + "/call", json=one_call("s1", tool=f"made-up-{i}"))
    metrics = httpx.get(tool_server + "/metrics").text
    assert 'tool="unknown"' in metrics and "made-up" not in metrics


def test_a_repeated_idempotency_key_gets_the_first_answer(tool_server):
    headers = {"Idempotency-Key": "k-1"}
    first = httpx.post(tool_server + "/call", json=one_call("i"), headers=headers).json()
    again = httpx.post(tool_server + "/call", json=one_call("i"), headers=headers).json()
    assert first == again and first["results"][0]["text"] == "i:1"
    assert httpx.post(tool_server + "/call", json=one_call("i")).json()["results"][0]["text"] == "i:2"
    other = httpx.post(tool_server + "/call", json=one_call("i", arguments={"step": 3}), headers=headers)
    assert other.status_code == 422


def test_a_call_whose_answer_timed_out_is_retried_but_runs_once(tool_server):
    async def main():
        client = ToolServerClient(tool_server, read_timeout_s=0.3, max_wait_s=20)
        try:
            observation = await client.call("once", "slow_counter", {"delay": 1.5}, timeout=5.0)
        finally:
            await client.close()
        return observation.text

    assert asyncio.run(main()) == "1"
    time.sleep(0.5)
    assert SlowCounter.calls == 1


# -- the global bound on calls executing at once -----------------------------------------------------

@pytest.fixture()
def busy_server():
    """At most 3 calls execute at once and 2 more may wait."""
    Held.running = Held.most = Held.total = 0
    SlowCounter.calls = 0
    app = create_tool_server(["tests.test_server_limits:Held", "tests.test_server_limits:SlowCounter"],
                             max_concurrent_calls=3, max_queued_calls=2)
    with serve_app(app) as url:
        yield url


def test_calls_beyond_the_concurrency_limit_queue_and_the_overflow_gets_429_at_once(busy_server):
    async def burst():
        async with httpx.AsyncClient(base_url=busy_server, timeout=30) as client:
            async def one(i):
                started = time.monotonic()
                response = await client.post("/call", json=one_call(f"h{i}", tool="held", arguments={"seconds": 2.0}))
                return response, time.monotonic() - started

            held = asyncio.gather(*(one(i) for i in range(10)))
            await asyncio.sleep(0.5)  # the queue is full now: a batch that does not fit is refused whole
            batch = {"requests": [{"trajectory_id": f"c{i}", "tool": "slow_counter"} for i in range(2)]}
            refused = await client.post("/call", json=batch)
            metrics = (await client.get("/metrics")).text
            return await held, refused, metrics

    answers, refused, metrics = asyncio.run(burst())
    codes = [response.status_code for response, _ in answers]
    assert sorted(codes) == [200] * 5 + [429] * 5, codes  # 3 running + 2 waiting; the rest refused
    assert Held.most == 3 and Held.total == 5  # never more than the limit at once, and no refused call ran
    for response, elapsed in answers:
        if response.status_code == 429:
            assert response.headers["Retry-After"] and elapsed < 1.5, elapsed  # long before a slot frees
        else:
            assert response.json()["results"][0]["text"] == "held"
    assert refused.status_code == 429 and SlowCounter.calls == 0
    assert "agentrl_tool_calls_running 3.0" in metrics and "agentrl_tool_calls_waiting 2.0" in metrics
    assert "agentrl_tool_busy_rejections_total 6.0" in metrics
    assert httpx.get(busy_server + "/metrics").text.count("agentrl_tool_calls_running 0.0") == 1


def test_a_batch_larger_than_the_call_queue_is_refused(busy_server):
    batch = {"requests": [{"trajectory_id": f"b{i}", "tool": "slow_counter"} for i in range(6)]}
    response = httpx.post(busy_server + "/call", json=batch)
    assert response.status_code == 422 and "at most 5 calls" in response.text
    assert SlowCounter.calls == 0


def test_the_client_retries_a_busy_server_and_every_call_runs_once(busy_server):
    async def main():
        client = ToolServerClient(busy_server, max_wait_s=30)
        try:
            return await asyncio.gather(*(client.call(f"r{i}", "held", {"seconds": 0.4}, timeout=30.0)
                                          for i in range(12)))
        finally:
            await client.close()

    observations = asyncio.run(main())
    assert [o.text for o in observations] == ["held"] * 12
    assert Held.most == 3 and Held.total == 12


def test_an_unknown_sticky_session_is_session_restarted(tool_server):
    result = httpx.post(tool_server + "/call", json=one_call("never-seen", resume=True)).json()["results"][0]
    assert result["status"] == "session_restarted" and "never-seen" in result["error"]
    assert httpx.get(tool_server + "/health").json()["sessions"] == 0


# -- retriever limits ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_index():
    return Index.from_documents(DOCUMENTS)


def test_retriever_query_length_and_count_are_limited(small_index):
    with serve_app(create_retriever(small_index, max_queries=8, max_query_chars=100)) as url:
        assert httpx.post(url + "/retrieve", json={"queries": ["lava"]}).status_code == 200
        assert httpx.post(url + "/retrieve", json={"queries": ["x" * 101]}).status_code == 422
        assert httpx.post(url + "/retrieve", json={"queries": ["lava"] * 9}).status_code == 422


def test_retriever_queue_is_bounded_with_429(small_index):
    app = create_retriever(small_index, wait_s=0.3, max_pending_queries=8)

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/retrieve", json={"queries": ["lava", "chess"]})
                                          for _ in range(20)))

    with serve_app(app) as url:
        responses = asyncio.run(burst(url))
        metrics = httpx.get(url + "/metrics").text
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) <= 8
    assert all(r.headers.get("Retry-After") for r in responses if r.status_code == 429)
    assert 'agentrl_retriever_requests_total{status="rejected"}' in metrics
