"""Behaviour logprobs are those of the distribution the engine sampled from (temperature, top-p),
and the trainer's forward pass scores the same distribution."""

import asyncio
import math

import pytest
import torch

from agentrl.algos.sampling import sampling_logprobs
from agentrl.engines.base import SamplingParams
from agentrl.engines.hf import HFEngine
from agentrl.models import tiny_model as make_tiny_model
from agentrl.trainer.batching import collate, forward_response
from agentrl.trajectory import Trajectory

LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0])


def test_temperature_divides_the_logits_before_the_softmax():
    q = torch.softmax(LOGITS / 0.5, 0)
    assert sampling_logprobs(LOGITS, torch.tensor(1), temperature=0.5).item() == pytest.approx(math.log(q[1]))
    # greedy requests are scored at temperature 1
    assert sampling_logprobs(LOGITS, torch.tensor(1), temperature=0.0).item() == pytest.approx(
        float(torch.log_softmax(LOGITS, 0)[1]))


def test_top_p_renormalises_over_the_nucleus():
    q = torch.softmax(LOGITS, 0)  # [0.644, 0.237, 0.087, 0.032]: top_p 0.8 keeps the first two
    nucleus = float(q[0] + q[1])
    assert sampling_logprobs(LOGITS, torch.tensor(1), top_p=0.8).item() == pytest.approx(math.log(q[1] / nucleus))
    # a token outside the nucleus (a later policy's view of an earlier sample) stays finite
    assert sampling_logprobs(LOGITS, torch.tensor(3), top_p=0.8).item() == pytest.approx(
        math.log(q[3] / (nucleus + q[3])))


@pytest.mark.parametrize(("temperature", "top_p"), [(0.7, 1.0), (1.3, 0.9)])
def test_engine_logprobs_equal_the_trainers_at_the_sampling_temperature_and_top_p(tokenizer, temperature, top_p):
    model = make_tiny_model(tokenizer, tie_word_embeddings=False).eval()
    engine = HFEngine(model, tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=top_p, seed=5)

    async def generate():
        try:
            return await engine.generate(prompt, params)
        finally:
            await engine.close()

    result = asyncio.run(generate())
    trajectory = Trajectory(id="t", group_id="g", prompt_ids=list(prompt))
    trajectory.append_model_tokens(result.token_ids, result.logprobs, 0, 0)
    batch = collate([trajectory], tokenizer.pad_token_id)
    with torch.no_grad():
        tempered = forward_response(model, batch, temperature=temperature, top_p=top_p).logprobs[0]
        plain = forward_response(model, batch).logprobs[0]
    recorded = torch.tensor(result.logprobs)
    assert torch.allclose(recorded, tempered, atol=1e-4)
    assert not torch.allclose(recorded, plain, atol=1e-2)  # T = 1 without top-p is a different policy


def test_the_nucleus_boundary_token_is_scored_inside_the_nucleus():
    """Membership is decided by rank (the mass ranked above the token is below p), as the engine keeps
    tokens; comparing probabilities computed two ways would put the boundary token outside by rounding
    and count its mass twice."""
    from agentrl.algos.sampling import sampling_logprobs

    generator = torch.Generator().manual_seed(0)
    wrong = 0
    for _ in range(200):
        logits = torch.randn(50, generator=generator) * 3
        top_p = float(torch.rand(1, generator=generator)) * 0.8 + 0.1
        q = torch.softmax(logits.double(), -1)
        order = torch.argsort(q, descending=True)
        cumulative = q[order].cumsum(0) - q[order]
        kept = order[cumulative < top_p]
        boundary = kept[-1]  # the nucleus's smallest token
        expected = torch.log(q[boundary] / q[kept].sum())
        got = sampling_logprobs(logits, boundary.reshape(()), top_p=top_p)
        wrong += abs(float(got) - float(expected)) > 1e-5
    assert wrong == 0
