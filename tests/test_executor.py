"""The executor: concurrent calls, per-tool limits, and every failure turned into an observation."""

import asyncio
import time

import pytest

from agentrl.executor import ToolExecutor, truncate_observation
from agentrl.parsing import ToolCall
from agentrl.tool import ToolContext

TOOLS = ["tests.helpers.demo_tools:Sleeper", "tests.helpers.demo_tools:Counter", "tests.helpers.demo_tools:Failing"]


def run_calls(calls, trajectory_id="t0"):
    async def main():
        executor = ToolExecutor(TOOLS)
        async with executor.session(trajectory_id) as session:
            return await session.run(calls)

    return asyncio.run(main())


@pytest.mark.parametrize(
    "mode, status, text",
    [
        ("tool_error", "error", "Error: the file does not exist"),
        ("crash", "error", "Error: ZeroDivisionError: division by zero"),
        ("hang", "timeout", "timed out after 0.3 s"),
        ("infra", "infra_error", "backend down"),
        ("fine", "ok", "fine"),
    ],
)
def test_failures_become_observations(mode, status, text):
    (result,) = run_calls([ToolCall("failing", {"mode": mode})])
    assert result.status == status and text in result.observation.text


def test_bad_arguments_name_the_parameter():
    (result,) = run_calls([ToolCall("sleeper", {"seconds": "long"})])
    assert result.status == "error" and "parameter 'seconds'" in result.observation.text


def test_unknown_tool_is_a_format_error_with_a_suggestion():
    (result,) = run_calls([ToolCall("sleepr", {"seconds": 0})])
    assert result.status == "format_error" and "Did you mean 'sleeper'" in result.observation.text


def test_oversized_output_is_cut_with_a_marker():
    (result,) = run_calls([ToolCall("failing", {"mode": "huge"})])
    assert len(result.observation.text) < 17_000 and "characters truncated" in result.observation.text


def test_calls_run_concurrently_and_return_in_call_order():
    started = time.perf_counter()
    results = run_calls([ToolCall("sleeper", {"seconds": s}) for s in (0.4, 0.1, 0.3)])
    assert time.perf_counter() - started < 0.9
    assert [r.observation.text for r in results] == ["slept 0.4", "slept 0.1", "slept 0.3"]


def test_two_hundred_calls_limited_to_twenty_take_about_ten_latencies():
    async def main():
        executor = ToolExecutor(TOOLS)
        sessions = [executor.session(f"t{i}") for i in range(200)]
        started = time.perf_counter()
        await asyncio.gather(*(s.run([ToolCall("sleeper", {"seconds": 0.1})]) for s in sessions))
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    assert 0.95 <= elapsed < 2.5, elapsed  # 200 / 20 = 10 rounds of 0.1 s, not 200


def test_instances_are_per_trajectory_and_keep_state():
    async def main():
        executor = ToolExecutor(TOOLS)
        a = executor.session("a", ToolContext("a"))
        b = executor.session("b", ToolContext("b"))
        first = await a.run([ToolCall("counter", {})])
        second = await a.run([ToolCall("counter", {"step": 2})])
        other = await b.run([ToolCall("counter", {})])
        await a.close()
        await b.close()
        return first[0].observation.text, second[0].observation.text, other[0].observation.text

    assert asyncio.run(main()) == ("a:1", "a:3", "b:1")


class FakeTokenizer:
    """Whitespace 'tokenizer' so the expected cut is easy to state."""

    def encode(self, text, add_special_tokens=False):
        return text.split(" ")

    def decode(self, ids):
        return " ".join(ids)


@pytest.mark.parametrize(
    "side, expected",
    [
        ("tail", "w0 w1 w2 w3\n[... 6 tokens truncated ...]\n"),
        ("head", "\n[... 6 tokens truncated ...]\nw6 w7 w8 w9"),
        ("middle", "w0 w1\n[... 6 tokens truncated ...]\nw8 w9"),
    ],
)
def test_observation_truncated_to_a_token_budget(side, expected):
    text = " ".join(f"w{i}" for i in range(10))
    assert truncate_observation(text, FakeTokenizer(), 4, side) == expected
    assert truncate_observation("short text", FakeTokenizer(), 4, side) == "short text"


def test_truncation_with_the_real_tokenizer_fits_the_budget(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 50
    cut = truncate_observation(text, tokenizer, 32, "middle")
    body = cut.replace(cut[cut.index("\n[..."): cut.index("...]\n") + 5], "")
    assert len(tokenizer.encode(body, add_special_tokens=False)) <= 34


STUCK = __import__("threading").Event()


class Stuck(__import__("agentrl").Tool):
    """A synchronous tool that hangs until released."""

    timeout = 0.2

    def call(self, x: int = 0) -> str:
        STUCK.wait(30)
        return "late"


def test_stuck_sync_tools_do_not_delay_a_generate(tokenizer, tiny_model):
    from agentrl.engines.base import SamplingParams
    from agentrl.engines.hf import HFEngine

    engine = HFEngine(tiny_model, tokenizer)
    prompt = tokenizer.encode("The capital of France is")

    async def main():
        await engine.generate(prompt, SamplingParams(max_new_tokens=2, temperature=0.0))  # warm up
        executor = ToolExecutor(["tests.test_executor:Stuck"])
        async with executor.session("t") as session:
            results = await session.run([ToolCall("stuck", {"x": i}) for i in range(40)])
        assert {r.status for r in results} == {"timeout"}  # 40 calls hold 16 threads of the tool pool
        started = time.perf_counter()
        result = await engine.generate(prompt, SamplingParams(max_new_tokens=4, temperature=0.0))
        generate_s = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, lambda: None)  # the default pool is free
        default_pool_s = time.perf_counter() - started
        await engine.close()
        await executor.close()
        return result, generate_s, default_pool_s

    try:
        result, generate_s, default_pool_s = asyncio.run(main())
    finally:
        STUCK.set()
    assert len(result.token_ids) == 4
    assert generate_s < 10 and default_pool_s < 5  # the stuck calls hang for 30 s
