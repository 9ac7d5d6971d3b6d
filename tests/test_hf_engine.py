"""The HF engine: batched, stop strings and budgets honoured, logprobs faithful, seeds reproducible."""

import asyncio
import copy
import os

import pytest
import torch

from agentrl.engines.base import Engine, SamplingParams
from agentrl.engines.hf import HFEngine
from agentrl.models import tiny_model as make_tiny_model

PROMPTS = [
    "Tell me about the weather today.",
    "What is 2 + 2?",
    "Write a very long story about a dragon who learned to fly over the mountains.",
    "Hi",
]


@pytest.fixture()
def tiny_model(tokenizer):
    """Untied embeddings, so greedy outputs differ between prompts and the batch tests mean something."""
    return make_tiny_model(tokenizer, tie_word_embeddings=False).eval()


def chat_ids(tokenizer, text):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def run(coroutine):
    return asyncio.run(coroutine)


def test_engine_implements_the_protocol(tiny_model, tokenizer):
    assert isinstance(HFEngine(tiny_model, tokenizer), Engine)


def test_max_new_tokens_is_honoured(tiny_model, tokenizer):
    engine = HFEngine(tiny_model, tokenizer)
    engine.eos_token_ids = set()  # a random model may sample EOS early; this test is about length
    result = run(
        engine.generate(chat_ids(tokenizer, "Hello"), SamplingParams(max_new_tokens=7, seed=1))
    )
    assert len(result.token_ids) == 7 and len(result.logprobs) == 7
    assert result.finish_reason == "length"


def test_stop_string_ends_generation_at_the_completing_token(tiny_model, tokenizer):
    engine = HFEngine(tiny_model, tokenizer)
    engine.eos_token_ids = set()
    prompt = chat_ids(tokenizer, "Hello")
    free = run(engine.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0)))
    text = tokenizer.decode(free.token_ids)
    # choose a stop string that the unconstrained greedy output contains after a few tokens
    k = 5
    stop = tokenizer.decode(free.token_ids[k - 1 : k]).strip() or tokenizer.decode(
        free.token_ids[k - 1 : k]
    )
    stopped = run(
        engine.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0, stop=[stop]))
    )
    assert stopped.finish_reason == "stop" and stopped.stop_text == stop
    decoded = tokenizer.decode(stopped.token_ids)
    assert stop in decoded
    assert stop not in tokenizer.decode(
        stopped.token_ids[:-1]
    )  # it stopped at the first completion
    assert free.token_ids[: len(stopped.token_ids)] == stopped.token_ids
    assert text.startswith(decoded)


def test_eos_finishes_with_eos(tiny_model, tokenizer):
    engine = HFEngine(tiny_model, tokenizer)
    prompt = chat_ids(tokenizer, "Hello")
    first = run(engine.generate(prompt, SamplingParams(max_new_tokens=3, temperature=0)))
    engine.eos_token_ids = {first.token_ids[0]}  # make the greedy first token count as EOS
    result = run(engine.generate(prompt, SamplingParams(max_new_tokens=10, temperature=0)))
    assert result.finish_reason == "eos" and result.token_ids == first.token_ids[:1]


def test_logprobs_match_a_separate_forward_pass(tiny_model, tokenizer):
    engine = HFEngine(tiny_model, tokenizer)
    prompt = chat_ids(tokenizer, PROMPTS[0])
    result = run(
        engine.generate(prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=3))
    )
    ids = torch.tensor([prompt + result.token_ids])
    with torch.no_grad():
        logits = tiny_model(ids).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1).gather(
        -1, torch.tensor(result.token_ids)[:, None]
    )[:, 0]
    assert torch.allclose(torch.tensor(result.logprobs), expected, atol=1e-4)


def test_greedy_output_is_identical_alone_and_in_a_batch(tiny_model, tokenizer):
    params = SamplingParams(max_new_tokens=16, temperature=0)
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]

    async def alone():
        engine = HFEngine(tiny_model, tokenizer)
        return [(await engine.generate(p, params)).token_ids for p in prompts]

    async def together():
        engine = HFEngine(tiny_model, tokenizer)
        results = await asyncio.gather(*(engine.generate(p, params) for p in prompts))
        assert engine.batch_sizes[len(prompts)] == 1, engine.batch_sizes
        return [r.token_ids for r in results]

    outputs = run(alone())
    assert len({tuple(tokens) for tokens in outputs}) > 1  # the prompts lead to different outputs
    assert outputs == run(together())


def test_concurrent_requests_run_as_batches(tiny_model, tokenizer):
    engine = HFEngine(tiny_model, tokenizer, max_batch_size=32)
    engine.eos_token_ids = set()
    prompts = [chat_ids(tokenizer, f"Question number {i}?") for i in range(32)]

    async def main():
        return await asyncio.gather(
            *(
                engine.generate(p, SamplingParams(max_new_tokens=8, seed=i))
                for i, p in enumerate(prompts)
            )
        )

    results = run(main())
    assert all(len(r.token_ids) == 8 for r in results)
    assert engine.batch_sizes == {32: 1}
    # for all 32 together: their chat template's shared opening once, then the rows' own tokens,
    # then seven decode steps
    assert engine.forward_calls == 1 + 1 + 7
    shared = len(os.path.commonprefix(prompts))
    assert shared >= 8
    assert engine.prefill_tokens == shared + 32 * (max(map(len, prompts)) - shared)


def test_seeded_sampling_is_reproducible_regardless_of_batch(tiny_model, tokenizer):
    prompt = chat_ids(tokenizer, PROMPTS[1])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=1234)

    async def alone():
        return (await HFEngine(tiny_model, tokenizer).generate(prompt, params)).token_ids

    async def with_others():
        engine = HFEngine(tiny_model, tokenizer)
        others = [
            engine.generate(chat_ids(tokenizer, p), SamplingParams(max_new_tokens=5, seed=9))
            for p in PROMPTS
        ]
        results = await asyncio.gather(engine.generate(prompt, params), *others)
        return results[0].token_ids

    assert run(alone()) == run(with_others())


def test_weight_swap_changes_output_and_bumps_version(tiny_model, tokenizer):
    model = copy.deepcopy(tiny_model)  # the fixture is shared: swap weights in a copy
    engine = HFEngine(model, tokenizer)
    prompt = chat_ids(tokenizer, PROMPTS[0])
    params = SamplingParams(max_new_tokens=8, temperature=0)
    before = run(engine.generate(prompt, params))
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    engine.update_weights(state)
    after = run(engine.generate(prompt, params))
    assert engine.policy_version == 1 and after.policy_version == 1 and before.policy_version == 0
    assert after.token_ids != before.token_ids


def test_empty_prompt_is_refused(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="at least one token"):
        run(HFEngine(tiny_model, tokenizer).generate([], SamplingParams()))


def test_a_request_arriving_mid_batch_joins_it_with_unchanged_output(tiny_model, tokenizer):
    long_params = SamplingParams(max_new_tokens=60, temperature=0)
    short_params = SamplingParams(max_new_tokens=12, temperature=0)
    long_prompt, short_prompt = chat_ids(tokenizer, PROMPTS[2]), chat_ids(tokenizer, PROMPTS[3])

    async def alone():
        engine = HFEngine(tiny_model, tokenizer)
        engine.eos_token_ids = set()
        first = await engine.generate(long_prompt, long_params)
        return first.token_ids, (await engine.generate(short_prompt, short_params)).token_ids

    async def joined():
        engine = HFEngine(tiny_model, tokenizer)
        engine.eos_token_ids = set()
        running = asyncio.ensure_future(engine.generate(long_prompt, long_params))
        while engine.forward_calls < 3:  # the long request is decoding
            await asyncio.sleep(0.001)
        short = await engine.generate(short_prompt, short_params)
        assert not running.done()  # the short one finished inside the long one's batch
        long = await running
        assert engine.joined == 1 and engine.batch_sizes == {1: 1}, (
            engine.joined,
            engine.batch_sizes,
        )
        return long.token_ids, short.token_ids

    assert run(alone()) == run(joined())


def test_in_flight_requests_keep_their_policy_version_across_a_weight_update(tiny_model, tokenizer):
    model = copy.deepcopy(tiny_model)
    engine = HFEngine(model, tokenizer)
    engine.eos_token_ids = set()
    prompt = chat_ids(tokenizer, PROMPTS[0])

    async def main():
        running = asyncio.ensure_future(engine.generate(prompt, SamplingParams(max_new_tokens=40)))
        while engine.forward_calls < 2:
            await asyncio.sleep(0.001)
        await asyncio.to_thread(engine.update_weights)  # the trainer shares the module: bump only
        later = await engine.generate(prompt, SamplingParams(max_new_tokens=4))
        return await running, later

    first, later = run(main())
    assert len(first.token_ids) == 40 and first.policy_version == 0
    assert later.policy_version == 1


def test_sampling_follows_the_temperature_and_top_p_distribution():
    from agentrl.engines.hf import _Request

    logits = torch.full((1000,), -float("inf"))
    logits[[3, 500, 998, 999]] = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    draws = 8000

    def frequencies(**params):
        request = _Request([1], SamplingParams(**params), None, generator=torch.Generator().manual_seed(0))
        counts = torch.bincount(torch.tensor([HFEngine._sample(logits, request) for _ in range(draws)]), minlength=1000)
        return counts.float() / draws

    plain = frequencies(temperature=1.0)
    assert plain.sum() == 1 and set(plain.nonzero().flatten().tolist()) == {3, 500, 998, 999}
    assert torch.allclose(plain[[3, 500, 998, 999]], torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.02)
    # top-p 0.65 keeps the two most likely tokens (0.4 + 0.3), renormalised
    nucleus = frequencies(temperature=1.0, top_p=0.65)
    assert set(nucleus.nonzero().flatten().tolist()) == {998, 999}
    assert abs(float(nucleus[999]) - 4 / 7) < 0.02
    # temperature 0.5 squares the probabilities before normalising
    sharp = frequencies(temperature=0.5)
    expected = torch.tensor([0.01, 0.04, 0.09, 0.16]) / 0.30
    assert torch.allclose(sharp[[3, 500, 998, 999]], expected, atol=0.02)


def test_decoding_runs_on_its_own_thread_when_the_default_pool_is_exhausted(tiny_model, tokenizer):
    """Sync tools run on the default executor; a stuck one must never hold up generation."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    engine = HFEngine(tiny_model, tokenizer)
    prompt = chat_ids(tokenizer, PROMPTS[1])

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        release = threading.Event()
        stuck = loop.run_in_executor(None, release.wait, 60)  # the only default thread, held
        try:
            return await asyncio.wait_for(engine.generate(prompt, SamplingParams(max_new_tokens=4)), 20)
        finally:
            release.set()
            await stuck

    assert len(run(main()).token_ids) >= 1


def test_a_cancelled_request_stops_decoding_and_leaves_the_batch(tiny_model, tokenizer):
    prompts = chat_ids(tokenizer, PROMPTS[0]), chat_ids(tokenizer, PROMPTS[1])
    kept = SamplingParams(max_new_tokens=30, temperature=0)

    async def alone():
        engine = HFEngine(tiny_model, tokenizer)
        engine.eos_token_ids = set()
        return (await engine.generate(prompts[1], kept)).token_ids

    async def with_a_cancelled_neighbour():
        engine = HFEngine(tiny_model, tokenizer)
        engine.eos_token_ids = set()
        cancelled = asyncio.ensure_future(engine.generate(prompts[0], SamplingParams(max_new_tokens=400)))
        other = asyncio.ensure_future(engine.generate(prompts[1], kept))
        while engine.forward_calls < 3:
            await asyncio.sleep(0.001)
        cancelled.cancel()
        result = await other
        # update_weights waits for the running batch: it returns once no row is left decoding
        await asyncio.wait_for(asyncio.to_thread(engine.update_weights), 120)
        assert engine.batch_sizes == {2: 1}
        # the prefill (the shared chat opening, then each row) plus the kept row's 29 decode
        # steps, not the cancelled row's 400
        assert engine.forward_calls <= 2 + 29, engine.forward_calls
        assert engine.rows_cancelled == 1
        return result.token_ids

    assert run(alone()) == run(with_a_cancelled_neighbour())


def test_the_cache_narrows_to_the_live_rows_when_long_rows_finish(tiny_model, tokenizer):
    long_prompt = chat_ids(tokenizer, " ".join(["The dragon flew over the mountains."] * 40))
    short_prompt = chat_ids(tokenizer, PROMPTS[3])
    long_params, short_params = SamplingParams(max_new_tokens=3, temperature=0), SamplingParams(max_new_tokens=80, temperature=0)
    assert len(long_prompt) > len(short_prompt) + 200

    async def alone():
        engine = HFEngine(tiny_model, tokenizer)
        engine.eos_token_ids = set()
        return (await engine.generate(long_prompt, long_params)).token_ids, (await engine.generate(short_prompt, short_params)).token_ids

    async def together():
        engine = HFEngine(tiny_model, tokenizer)
        engine.eos_token_ids = set()
        long = asyncio.ensure_future(engine.generate(long_prompt, long_params))
        short = asyncio.ensure_future(engine.generate(short_prompt, short_params))
        long_result = await long
        widths = []
        while not short.done():
            widths.append(engine.cache_width)
            await asyncio.sleep(0.001)
        assert engine.batch_sizes == {2: 1}  # both rows decoded in one batch
        live = [w for w in widths if w]
        # the long row's prompt no longer pads the short row's cache
        assert live and min(live) <= len(short_prompt) + short_params.max_new_tokens, (len(long_prompt), live[:5])
        assert engine.cache_width == 0  # nothing held once the batch is gone
        return long_result.token_ids, (await short).token_ids

    assert run(alone()) == run(together())


def test_drain_returns_once_cancelled_requests_have_left_the_decode_thread(tiny_model, tokenizer):
    engine = HFEngine(tiny_model, tokenizer)
    engine.eos_token_ids = set()

    async def main():
        requests = [asyncio.ensure_future(engine.generate(chat_ids(tokenizer, p), SamplingParams(max_new_tokens=400)))
                    for p in PROMPTS]
        while engine.forward_calls < 3:
            await asyncio.sleep(0.001)
        for request in requests:
            request.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        await asyncio.wait_for(engine.drain(), 60)
        calls = engine.forward_calls
        await asyncio.sleep(0.2)
        return calls

    calls = run(main())
    assert calls == engine.forward_calls < 100  # nothing decodes after drain; the 400-token budgets were abandoned
    assert engine.rows_cancelled == len(PROMPTS) and engine.cache_width == 0


def test_a_shared_prompt_prefix_is_computed_once_and_changes_no_output(tiny_model, tokenizer):
    instructions = " ".join(["Answer with the fewest words you can, and search before you answer."] * 6)
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": instructions},
                                              {"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
               for text in PROMPTS]
    shared = len(os.path.commonprefix(prompts))
    assert shared > 60 and len({len(p) for p in prompts}) == len(prompts)
    budgets = [6, 12, 3, 20]  # rows leave at different steps: the cache is compacted each time

    async def alone():
        engine = HFEngine(tiny_model, tokenizer)
        engine.eos_token_ids = set()
        return [await engine.generate(p, SamplingParams(max_new_tokens=n, temperature=0.7, seed=i))
                for i, (p, n) in enumerate(zip(prompts, budgets))]

    async def together():
        engine = HFEngine(tiny_model, tokenizer)
        engine.eos_token_ids = set()
        results = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=n, temperature=0.7, seed=i))
                                         for i, (p, n) in enumerate(zip(prompts, budgets))))
        assert engine.batch_sizes == {4: 1}
        assert engine.prefill_tokens == shared + 4 * (max(map(len, prompts)) - shared)
        assert engine.cache_width == 0
        return results

    single, batched = run(alone()), run(together())
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    for a, b in zip(batched, single):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_compacting_the_cache_keeps_each_row_and_its_order():
    from transformers.cache_utils import DynamicCache

    from agentrl.engines.hf import _compact

    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    keys = torch.arange(3 * 6, dtype=torch.float).reshape(3, 1, 6, 1)
    cache = DynamicCache()
    cache.update(keys.clone(), -keys.clone(), 0)
    compacted = _compact(cache, mask)
    assert compacted.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    layer = cache.layers[0]
    attended = [[k for k, m in zip(row, row_mask) if m] for row, row_mask in zip(layer.keys[:, 0, :, 0].tolist(), compacted)]
    assert attended == [[0, 1, 4, 5], [6, 7, 9, 10, 11], [15, 16, 17]]
    assert torch.equal(layer.values, -layer.keys)
