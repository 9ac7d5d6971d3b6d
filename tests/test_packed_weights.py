"""The HF engine's float32 CPU decoding through oneDNN with packed weights: the same logits as
torch's own linear to float32 rounding, and never a stale weight after the policy changes."""

from __future__ import annotations

import asyncio

import pytest
import torch

from agentrl.engines import packed
from agentrl.engines.base import SamplingParams
from agentrl.engines.hf import HFEngine
from agentrl.models import tiny_model as make_tiny_model

pytestmark = pytest.mark.skipif(not packed.available(), reason="oneDNN's packed linear is not available here")


def linear_weights(model) -> int:
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))


def logits(model, ids, mode=None):
    with torch.inference_mode(), mode or torch.inference_mode():
        return model(input_ids=ids).logits


def test_packed_logits_match_torch_and_each_weight_is_packed_once(tokenizer):
    model = make_tiny_model(tokenizer, hidden_size=128, num_layers=2).eval()
    ids = torch.randint(0, len(tokenizer), (3, 17))
    mode = packed.PackedLinears()
    reference = logits(model, ids)
    assert torch.allclose(logits(model, ids, mode), reference, rtol=1e-4, atol=1e-4)
    assert mode.packings == linear_weights(model)  # the tied embedding/head counts once
    logits(model, ids, mode)
    assert mode.packings == linear_weights(model)  # unchanged weights are not packed again


@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict"])
def test_a_changed_weight_is_packed_again_before_it_is_used(tokenizer, change):
    model = make_tiny_model(tokenizer, hidden_size=128, num_layers=2)
    ids = torch.randint(0, len(tokenizer), (2, 9))
    mode = packed.PackedLinears()
    before = logits(model, ids, mode)
    if change == "optimizer_step":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    else:
        model.load_state_dict(make_tiny_model(tokenizer, seed=7, hidden_size=128, num_layers=2).state_dict())
    after = logits(model, ids, mode)
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.allclose(after, logits(model, ids), rtol=1e-4, atol=1e-4)


def test_the_engine_decodes_with_the_weights_it_was_given_after_an_update(tokenizer):
    model = make_tiny_model(tokenizer, hidden_size=128, num_layers=2, tie_word_embeddings=False).eval()
    other = make_tiny_model(tokenizer, seed=3, hidden_size=128, num_layers=2, tie_word_embeddings=False).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a river."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    params = SamplingParams(max_new_tokens=12, temperature=0)

    def decode(engine):
        async def main():
            try:
                return (await engine.generate(prompt, params)).token_ids
            finally:
                await engine.close()
        return asyncio.run(main())

    def greedy(m):
        engine = HFEngine(m, tokenizer, packed_weights=False)
        engine.eos_token_ids = set()
        return decode(engine)

    engine = HFEngine(model, tokenizer)
    engine.eos_token_ids = set()
    assert engine.packed is not None  # float32 on the CPU: packed by default
    first = decode(engine)
    assert first == greedy(model)
    engine.update_weights(other.state_dict())  # in place, between batches
    second = decode(engine)
    assert second == greedy(other) and second != first


@pytest.mark.parametrize("setting, packs", [(None, True), ("false", False)])
def test_rollout_packed_weights_reaches_the_engine(tokenizer, tiny_model, setting, packs):
    from agentrl.config import build_config
    from agentrl.engines import build_engine

    config = build_config({}, [] if setting is None else [f"rollout.packed_weights={setting}"])
    assert (build_engine(config, tiny_model, tokenizer).packed is not None) is packs
    bf16 = make_tiny_model(tokenizer).to(torch.bfloat16)
    assert build_engine(config, bf16, tokenizer).packed is None  # bfloat16 already runs through oneDNN


def test_the_packed_copies_of_trained_weights_are_freed_before_each_update(tmp_path, tiny_model_dir):
    from agentrl.trainer.local import build_run, close_run, train_step
    from tests.test_trainer_math import tiny_run_config

    config = tiny_run_config(tmp_path, tiny_model_dir, tracking={"progress": False, "plot": False})
    run = build_run(config)
    try:
        engine = run.engine
        frozen = run.model.get_input_embeddings().weight
        frozen.requires_grad_(False)  # as a LoRA run's base: the update leaves it as it is
        train_step(run)
        # the step sampled (every linear packed), then freed the trained weights' copies before its update
        packed = [entry[0]() for entry in engine.packed._packed.values()]
        assert len(packed) == 1 and packed[0] is frozen
        assert engine.packed.packings == linear_weights(run.model)
    finally:
        close_run(run)
