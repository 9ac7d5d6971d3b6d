"""The OpenAI-compatible engine against a local stand-in of a vLLM server (FastAPI on 127.0.0.1)
that answers /v1/completions from a real engine, in vLLM's response format."""

import asyncio

import pytest
from agentrl.envs.search_qa import SearchQAEnv
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from agentrl.config import RolloutConfig, ToolsConfig
from agentrl.engines.base import SamplingParams
from agentrl.engines.openai import EngineRequestError, OpenAIEngine, WeightSyncError
from agentrl.executor import ToolExecutor
from agentrl.rollout import RolloutWorker
from tests.helpers.scripted import ScriptedEngine
from tests.helpers.servers import serve_app


def completions_app(backend, fail_first: int = 0, token_strings: bool = False, token_ids: bool = True,
                    max_model_len: int | None = None, reprompt: bool = False):
    """vLLM's /v1/completions as vLLM >= 0.10 answers it: token-id prompts, ``token_ids`` and
    ``prompt_token_ids`` on the choice (``return_token_ids``), ``token_id:N`` logprob tokens
    (``return_tokens_as_token_ids``), the matched stop string (or None) in ``stop_reason``."""
    app = FastAPI()
    seen: list[dict] = []
    failures = {"left": fail_first}

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/v1/models")
    async def models():
        card = {"id": "tiny", "object": "model", "owned_by": "vllm"}
        if max_model_len is not None:
            card["max_model_len"] = max_model_len
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        seen.append(body)
        if failures["left"] > 0:
            failures["left"] -= 1
            return JSONResponse({"error": "overloaded"}, status_code=503)
        if not isinstance(body["prompt"], list) or body.get("max_tokens", 0) <= 0:
            return JSONResponse({"object": "error", "message": "bad request", "code": 400}, status_code=400)
        if max_model_len is not None and len(body["prompt"]) + body["max_tokens"] > max_model_len:
            return JSONResponse({"object": "error", "code": 400, "message": f"This model's maximum context length is "
                                 f"{max_model_len} tokens."}, status_code=400)
        params = SamplingParams(max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                                top_p=body["top_p"], stop=body.get("stop", []), seed=body.get("seed"))
        result = await backend.generate(body["prompt"], params)
        tokens = [f"t{i}" if token_strings else f"token_id:{i}" for i in result.token_ids]
        reason = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}[result.finish_reason]
        stop_reason = result.stop_text if result.finish_reason == "stop" else None
        choice = {"index": 0, "text": "", "finish_reason": reason, "stop_reason": stop_reason,
                  "logprobs": {"text_offset": [0] * len(tokens), "tokens": tokens, "token_logprobs": result.logprobs,
                               "top_logprobs": [{t: lp} for t, lp in zip(tokens, result.logprobs)]}}
        if token_ids and body.get("return_token_ids"):
            choice["token_ids"] = result.token_ids
            choice["prompt_token_ids"] = body["prompt"][1:] if reprompt else body["prompt"]
        return {"id": "cmpl-1", "object": "text_completion", "model": "tiny", "choices": [choice],
                "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(result.token_ids)}}

    app.state.seen = seen
    return app


def sglang_app(backend, eos_token_id: int):
    """SGLang's native /generate: input_ids in; output_ids, meta_info.output_token_logprobs
    ([logprob, id, text]) and meta_info.finish_reason ({"type": ..., "matched": ...}) out."""
    app = FastAPI()
    seen: list[dict] = []

    @app.get("/health")
    async def health():
        return {}

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        seen.append(body)
        sampling = body["sampling_params"]
        params = SamplingParams(max_new_tokens=sampling["max_new_tokens"], temperature=sampling["temperature"],
                                top_p=sampling["top_p"], stop=sampling.get("stop", []), seed=sampling.get("sampling_seed"))
        result = await backend.generate(body["input_ids"], params)
        if result.finish_reason == "length":
            finish = {"type": "length", "length": len(result.token_ids)}
        elif result.finish_reason == "stop":
            finish = {"type": "stop", "matched": result.stop_text}
        else:
            finish = {"type": "stop", "matched": eos_token_id}
        return {"text": "", "output_ids": result.token_ids, "meta_info": {
            "id": "r1", "finish_reason": finish, "prompt_tokens": len(body["input_ids"]),
            "completion_tokens": len(result.token_ids), "cached_tokens": 0,
            "output_token_logprobs": [[lp, i, None] for lp, i in zip(result.logprobs, result.token_ids)],
        }}

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
    assert body["prompt"] == prompt and body["return_token_ids"] and body["logprobs"] == 0
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
    app = completions_app(StopScripted(tokenizer, lambda c: "hello"), token_strings=True, token_ids=False)
    with serve_app(app) as url:
        async def main(max_tokens):
            engine = OpenAIEngine(url, attempts=1)
            try:
                return await engine.generate([1, 2], SamplingParams(max_new_tokens=max_tokens))
            finally:
                await engine.close()

        with pytest.raises(EngineRequestError, match="returned no token ids.*return_token_ids"):
            asyncio.run(main(4))
    app = completions_app(StopScripted(tokenizer, lambda c: "hello"), max_model_len=8)
    with serve_app(app) as url:
        async def overflow():
            engine = OpenAIEngine(url, attempts=1, max_model_len=100)  # believes a longer context than served
            try:
                return await engine.generate(list(range(1, 7)), SamplingParams(max_new_tokens=4))
            finally:
                await engine.close()

        with pytest.raises(EngineRequestError, match="answered 400.*maximum context length is 8"):
            asyncio.run(overflow())
    app = completions_app(StopScripted(tokenizer, lambda c: "hello"), reprompt=True)
    with serve_app(app) as url:
        with pytest.raises(EngineRequestError, match="other prompt ids than the ones sent"):
            asyncio.run(main(4))


def test_max_tokens_is_clamped_to_the_served_context_length(tokenizer):
    app = completions_app(StopScripted(tokenizer, lambda c: "word " * 40), max_model_len=20)
    with serve_app(app) as url:
        async def main():
            engine = OpenAIEngine(url, model="tiny")
            try:
                long = await engine.generate(list(range(1, 13)), SamplingParams(max_new_tokens=50))
                full = await engine.generate(list(range(1, 21)), SamplingParams(max_new_tokens=50))
                return engine.max_model_len, long, full
            finally:
                await engine.close()

        max_model_len, long, full = asyncio.run(main())
    assert max_model_len == 20 and app.state.seen[0]["max_tokens"] == 8
    assert len(long.token_ids) == 8 and long.finish_reason == "length"
    assert full.token_ids == [] and full.finish_reason == "length" and len(app.state.seen) == 1  # nothing to ask


def test_one_engine_serves_several_event_loops(tokenizer):
    app = completions_app(StopScripted(tokenizer, lambda c: "<answer>x</answer>"))
    with serve_app(app) as url:
        engine = OpenAIEngine(url)

        async def once():
            return await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=8, stop=["</answer>"]))

        first, second = asyncio.run(once()), asyncio.run(once())  # each asyncio.run is a new loop
    assert first.token_ids == second.token_ids and first.finish_reason == second.finish_reason == "stop"


def test_weights_are_not_pretended_to_be_loaded(tokenizer):
    app = completions_app(StopScripted(tokenizer, lambda c: "<answer>x</answer>"))
    with serve_app(app) as url:
        engine = OpenAIEngine(url)
        with pytest.raises(WeightSyncError, match="owns its weights.*set_policy_version"):
            engine.update_weights()
        with pytest.raises(WeightSyncError):
            engine.update_weights({"w": 1})
        assert engine.policy_version == 0
        engine.set_policy_version(3)
        result = asyncio.run(engine.generate([1, 2], SamplingParams(max_new_tokens=4)))
        with pytest.raises(ValueError, match="older"):
            engine.set_policy_version(2)
    assert result.policy_version == 3


def test_sglang_generate_gives_ids_logprobs_and_stop_reasons(tokenizer, tiny_model):
    from agentrl.engines.hf import HFEngine

    prompt = tokenizer.encode("The capital of France is")
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    direct = asyncio.run(HFEngine(tiny_model, tokenizer).generate(prompt, params))
    app = sglang_app(HFEngine(tiny_model, tokenizer), tokenizer.eos_token_id)
    with serve_app(app) as url:
        async def remote():
            engine = OpenAIEngine(url, server="sglang", max_model_len=2048)
            try:
                return await engine.generate(prompt, params)
            finally:
                await engine.close()

        result = asyncio.run(remote())
    assert result.token_ids == direct.token_ids and result.finish_reason == direct.finish_reason
    assert result.logprobs == pytest.approx(direct.logprobs, abs=1e-5)
    body = app.state.seen[0]
    assert body["input_ids"] == prompt and body["return_logprob"] is True
    assert body["sampling_params"]["no_stop_trim"] is True and body["sampling_params"]["max_new_tokens"] == 12


def test_a_json_rollout_through_sglang_closes_each_tool_call_turn_like_the_template(tokenizer):
    from agentrl.envs.base import Env, Reward, Task

    class JsonEnv(Env):
        name, tools, action_format = "json_env", ("search",), "json"

        def make_task(self, row, index):
            return Task(id="j", messages=[{"role": "user", "content": "Who is Laskam Glimbys?"}])

        def reward(self, task, trajectory):
            return Reward(float(trajectory.answer is not None))

    call = '<tool_call>{"name": "search", "arguments": {"query": "Laskam Glimbys"}}</tool_call>'
    app = sglang_app(StopScripted(tokenizer, lambda c: call if "<|im_start|>tool" not in c else
                                  "<answer>a beekeeper</answer>"), tokenizer.eos_token_id)
    with serve_app(app) as url:
        async def main():
            engine = OpenAIEngine(url, server="sglang", max_model_len=2048)
            env = JsonEnv()
            worker = RolloutWorker(engine, tokenizer, env, ToolExecutor(["search"]), RolloutConfig(), ToolsConfig())
            try:
                return await worker.run_trajectory(env.make_task({}, 0))
            finally:
                await engine.close()

        trajectory = asyncio.run(main())
    assert trajectory.stop_reason == "answer" and trajectory.reward == 1.0
    text = tokenizer.decode(trajectory.response_ids)
    assert text.startswith(call + "<|im_end|>\n<|im_start|>tool\n")  # a stop string, not an EOS: the glue is there
    assert app.state.seen[0]["sampling_params"]["stop"] == ["</tool_call>", "</answer>"]
