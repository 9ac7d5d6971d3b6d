"""The OpenAI-compatible engine against a local stand-in of a vLLM server (FastAPI on 127.0.0.1)
that answers /v1/completions from a real engine, in vLLM's response format."""

import asyncio

import pytest
from agentrl.envs.search_qa import SearchQAEnv
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from agentrl.config import RolloutConfig, ToolsConfig
from agentrl.engines.base import SamplingParams
from agentrl.engines.openai import EngineRequestError, OpenAIEngine
from agentrl.executor import ToolExecutor
from agentrl.rollout import RolloutWorker
from tests.helpers.scripted import ScriptedEngine
from tests.helpers.servers import serve_app


def completions_app(backend, fail_first: int = 0, token_strings: bool = False):
    """A vLLM-style server: token-id prompts, ``token_id:N`` tokens, stop_reason for stop strings."""
    app = FastAPI()
    seen: list[dict] = []
    failures = {"left": fail_first}

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        seen.append(body)
        if failures["left"] > 0:
            failures["left"] -= 1
            return JSONResponse({"error": "overloaded"}, status_code=503)
        if not isinstance(body["prompt"], list) or body.get("max_tokens", 0) <= 0:
            return JSONResponse({"error": "bad request"}, status_code=400)
        params = SamplingParams(max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                                top_p=body["top_p"], stop=body.get("stop", []), seed=body.get("seed"))
        result = await backend.generate(body["prompt"], params)
        tokens = [f"t{i}" if token_strings else f"token_id:{i}" for i in result.token_ids]
        reason = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}[result.finish_reason]
        stop_reason = result.stop_text if result.finish_reason == "stop" else None
        return {"id": "cmpl-1", "object": "text_completion", "choices": [{
            "index": 0, "text": "", "finish_reason": reason, "stop_reason": stop_reason,
            "logprobs": {"tokens": tokens, "token_logprobs": result.logprobs},
        }]}

    app.state.seen = seen
    return app


class StopScripted(ScriptedEngine):
    """Reports the matched stop string, as vLLM does."""

    async def generate(self, prompt_ids, params):
        result = await super().generate(prompt_ids, params)
        text = self.tokenizer.decode(result.token_ids)
        if result.finish_reason == "stop":
            result.stop_text = next((s for s in params.stop if text.endswith(s)), None)
            result.finish_reason = "stop" if result.stop_text else "eos"
        return result


def search_then_answer(conversation):
    if "<information>" not in conversation.split("Question:")[-1]:
        return "Let me search. <search> Laskam Glimbys </search>"
    return "<answer> beekeeper </answer>"


QUESTION = {"id": "q0", "question": "What was the profession of Laskam Glimbys?", "golden_answers": ["beekeeper"]}


def test_greedy_tokens_and_logprobs_match_the_engine_behind_the_server(tokenizer, tiny_model):
    from agentrl.engines.hf import HFEngine

    prompt = tokenizer.encode("The capital of France is")
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    direct = asyncio.run(HFEngine(tiny_model, tokenizer).generate(prompt, params))
    app = completions_app(HFEngine(tiny_model, tokenizer))
    with serve_app(app) as url:
        async def remote():
            engine = OpenAIEngine(url, model="tiny")
            try:
                return await engine.generate(prompt, params)
            finally:
                await engine.close()

        result = asyncio.run(remote())
    assert result.token_ids == direct.token_ids and result.finish_reason == direct.finish_reason
    assert result.logprobs == pytest.approx(direct.logprobs, abs=1e-5)
    body = app.state.seen[0]
    assert body["prompt"] == prompt and body["return_tokens_as_token_ids"] and body["logprobs"] == 0
    assert body["model"] == "tiny" and body["max_tokens"] == 12


def test_a_rollout_through_the_http_engine_is_token_faithful(tokenizer):
    app = completions_app(StopScripted(tokenizer, search_then_answer))
    with serve_app(app) as url:
        async def main():
            engine = OpenAIEngine(url)
            env = SearchQAEnv(prompt="short")
            worker = RolloutWorker(engine, tokenizer, env, ToolExecutor(["search"]), RolloutConfig(), ToolsConfig())
            try:
                return await worker.run_trajectory(env.make_task(QUESTION, 0))
            finally:
                await engine.close()

        trajectory = asyncio.run(main())
    trajectory.validate()
    assert trajectory.stop_reason == "answer" and trajectory.reward == 1.0
    first = tokenizer.encode("Let me search. <search> Laskam Glimbys </search>", add_special_tokens=False)
    assert trajectory.response_ids[: len(first)] == first and trajectory.logprobs[0] == -0.5
    assert {"</search>", "</answer>"} <= set(app.state.seen[0]["stop"])


def test_transient_failures_are_retried(tokenizer):
    app = completions_app(StopScripted(tokenizer, lambda c: "<answer>x</answer>"), fail_first=2)
    with serve_app(app) as url:
        async def main():
            engine = OpenAIEngine(url, attempts=3)
            try:
                return await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=8, stop=["</answer>"]))
            finally:
                await engine.close()

        result = asyncio.run(main())
    assert result.finish_reason == "stop" and result.stop_text == "</answer>" and len(app.state.seen) == 3


def test_an_unreachable_server_is_an_infra_error_for_the_trajectory(tokenizer):
    async def main():
        engine = OpenAIEngine("http://127.0.0.1:9", attempts=2)
        env = SearchQAEnv(prompt="short")
        worker = RolloutWorker(engine, tokenizer, env, ToolExecutor(["search"]), RolloutConfig(), ToolsConfig())
        try:
            return await worker.run_batch([env.make_task(QUESTION, 0)], group_size=2)
        finally:
            await engine.close()

    batch = asyncio.run(main())
    assert all(t.status == "infra_error" and not t.trainable for t in batch.trajectories)
    assert batch.metrics["status/infra_error"] == 1.0


def test_servers_without_token_ids_or_with_bad_requests_get_clear_errors(tokenizer):
    app = completions_app(StopScripted(tokenizer, lambda c: "hello"), token_strings=True)
    with serve_app(app) as url:
        async def main(max_tokens):
            engine = OpenAIEngine(url, attempts=1)
            try:
                return await engine.generate([1, 2], SamplingParams(max_new_tokens=max_tokens))
            finally:
                await engine.close()

        with pytest.raises(EngineRequestError, match="return_tokens_as_token_ids"):
            asyncio.run(main(4))
        with pytest.raises(EngineRequestError, match="answered 400"):
            asyncio.run(main(0))
