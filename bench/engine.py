"""Engine throughput: 32 concurrent requests through the batched HF engine vs the same 32 requests
run one at a time with ``model.generate`` (greedy, same prompts and token budget, one run).

    .venv/bin/python bench/engine.py [--requests 32] [--max-new-tokens 64] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time

import torch

from agentrl.engines.base import SamplingParams
from agentrl.engines.hf import HFEngine
from agentrl.models import load_model

TOPICS = ["rivers", "volcanoes", "bees", "chess", "bread", "rain", "trains", "the moon"]


def prompts(tokenizer, count: int) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write {i % 4 + 2} sentences about {TOPICS[i % len(TOPICS)]}."}],
            add_generation_prompt=True, tokenize=True, return_dict=False,
        )
        for i in range(count)
    ]


def sequential(model, tokenizer, prompt_ids, max_new_tokens) -> tuple[list[list[int]], float]:
    outputs = []
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in prompt_ids:
            output = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )
            outputs.append(output[0, len(ids) :].tolist())  # one row: no padding after EOS
    return outputs, time.perf_counter() - started


def batched(model, tokenizer, prompt_ids, max_new_tokens, max_batch_size) -> tuple[list[list[int]], float]:
    async def main():
        engine = HFEngine(model, tokenizer, max_batch_size=max_batch_size)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
        started = time.perf_counter()
        results = await asyncio.gather(*(engine.generate(ids, params) for ids in prompt_ids))
        elapsed = time.perf_counter() - started
        await engine.close()
        return [r.token_ids for r in results], elapsed

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model.eval()
    prompt_ids = prompts(tokenizer, args.requests)
    batched(model, tokenizer, prompt_ids[:2], 4, args.requests)  # warm-up
    seq_outputs, seq_time = sequential(model, tokenizer, prompt_ids, args.max_new_tokens)
    bat_outputs, bat_time = batched(model, tokenizer, prompt_ids, args.max_new_tokens, args.requests)
    seq_tokens, bat_tokens = sum(map(len, seq_outputs)), sum(map(len, bat_outputs))
    same = sum(a == b for a, b in zip(seq_outputs, bat_outputs))
    seq_rate, bat_rate = seq_tokens / seq_time, bat_tokens / bat_time
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"{'method':<34}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}")
    print(f"{'model.generate, one at a time':<34}{seq_tokens:>8}{seq_time:>10.1f}{seq_rate:>10.1f}")
    print(f"{'HFEngine, ' + str(args.requests) + ' concurrent':<34}{bat_tokens:>8}{bat_time:>10.1f}{bat_rate:>10.1f}")
    print(f"identical greedy outputs: {same}/{len(prompt_ids)}")
    print(f"speed-up: {bat_rate / seq_rate:.2f}x")


if __name__ == "__main__":
    main()
