"""Models: the embedded SmolLM2 loads from its wheel (cached as safetensors) and answers sensibly."""

import asyncio
import time

import pytest

from agentrl.engines.base import SamplingParams
from agentrl.engines.hf import HFEngine
from agentrl.models import (
    EMBEDDED_MODEL,
    ModelNotFoundError,
    embedded_gguf_path,
    embedded_model_dir,
    load_model,
    resolve_model_path,
    tiny_model,
)


def test_gguf_ships_inside_the_wheel():
    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_embedded_model_answers_capital_of_france():
    embedded_model_dir()  # convert once (cached across runs)
    started = time.perf_counter()
    model, tokenizer = load_model(EMBEDDED_MODEL)
    assert time.perf_counter() - started < 15, "the cached safetensors copy should load in seconds"
    assert (embedded_model_dir() / "model.safetensors").is_file()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=True, return_dict=False,
    )
    engine = HFEngine(model, tokenizer)
    result = asyncio.run(engine.generate(prompt, SamplingParams(max_new_tokens=24, temperature=0)))
    assert "Paris" in tokenizer.decode(result.token_ids)
    assert result.finish_reason in ("eos", "length")


def test_local_model_directory_loads(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert model.config.num_hidden_layers == 2 and tokenizer.chat_template


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a local Hugging Face model directory"):
        resolve_model_path(str(tmp_path / "missing"))


def test_tiny_model_is_deterministic_for_a_seed(tokenizer):
    a, b = tiny_model(tokenizer, seed=3), tiny_model(tokenizer, seed=3)
    assert all((pa == pb).all() for pa, pb in zip(a.parameters(), b.parameters()))
    assert a.config.vocab_size == len(tokenizer)
