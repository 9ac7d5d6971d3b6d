"""Images reach a vision-language policy: the tiny SmolVLM (Idefics3) built offline sees the task's
image and every image the image tool returns, as pixels; the trainer's forward pass gets exactly
what the engine was given; an image budget ends a trajectory with its own stop reason."""

import asyncio
import base64
import io
import json

import pytest
import torch
from agentrl.envs.base import Env, Reward, Task
from PIL import Image, ImageDraw

from agentrl.config import RolloutConfig
from agentrl.engines.base import GenerationResult, SamplingParams
from agentrl.engines.hf import HFEngine
from agentrl.executor import ToolExecutor
from agentrl.models import load_model
from agentrl.multimodal import (
    ImageInputs,
    digest,
    model_inputs,
    process_image,
    processor_for,
    store_images_by_reference,
    trajectory_image_inputs,
)
from agentrl.rollout import RolloutWorker
from agentrl.trainer.batching import collate, forward_response
from agentrl.trajectory import Trajectory, read_jsonl, write_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vision():
    model, tokenizer = load_model("tiny-smolvlm")
    return model.eval(), tokenizer, processor_for(tokenizer)


def picture(seed: int = 0, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A small canvas with a red square and a blue bar: a crop of it differs from the whole."""
    image = Image.new("RGB", size, (250, 250, 245))
    canvas = ImageDraw.Draw(image)
    canvas.rectangle((10 + seed, 8, 30 + seed, 28), fill=(220, 30, 30))
    canvas.rectangle((50, 40, 90, 48), fill=(30, 70, 220))
    return image


class PictureEnv(Env):
    name = "picture"
    tools = ("image",)
    action_format = "json"
    answer_tag = "answer"
    final_turn_message = "Answer now."

    def load(self, split, path=None):
        return [{"id": "p0"}]

    def make_task(self, row, index):
        return Task(id=row["id"], messages=[{"role": "user", "content": "What colour is the square?"}],
                    answer="red", images=[picture()])

    def reward(self, task, trajectory):
        return Reward(float(trajectory.answer == task.answer), trajectory.answer == task.answer)


ZOOM = '<tool_call>{"name": "image", "arguments": {"operation": "zoom", "box": [0, 0, 48, 32], "factor": 2}}</tool_call>'
CROP = '<tool_call>{"name": "image", "arguments": {"operation": "crop", "box": [16, 12, 64, 48]}}</tool_call>'


class ScriptThenModel:
    """Scripted tool calls for the first turns, then a real engine (HF, or a vLLM server that
    outlives the trajectory: ``close_engine=False``); every request (its ids and its images) is
    recorded. One trajectory at a time."""

    def __init__(self, engine, tokenizer, actions: list[str], close_engine: bool = True):
        self.engine, self.tokenizer, self.actions = engine, tokenizer, list(actions)
        self.close_engine = close_engine
        self.policy_version = 0
        self.requests: list[tuple[list[int], ImageInputs | None]] = []

    async def generate(self, prompt_ids, params: SamplingParams, images: ImageInputs | None = None):
        self.requests.append((list(prompt_ids), images))
        if self.actions:
            ids = self.tokenizer.encode(self.actions.pop(0), add_special_tokens=False)
            return GenerationResult(ids, [-0.5] * len(ids), "stop", "</tool_call>", 0)
        return await self.engine.generate(prompt_ids, params, images=images)

    def update_weights(self, state_dict=None):
        pass

    async def close(self):
        if self.close_engine:
            await self.engine.close()


def run_one(engine, tokenizer, **rollout) -> Trajectory:
    config = RolloutConfig(**{"group_size": 1, "max_turns": 3, "max_new_tokens": 64, "max_response_tokens": 600,
                              "group_retries": 0, **rollout})
    worker = RolloutWorker(engine, tokenizer, PictureEnv(), ToolExecutor(["image"]), config)

    async def main():
        try:
            return await worker.run_trajectory(PictureEnv().make_task({"id": "p0"}, 0), seed=3)
        finally:
            await engine.close()

    return asyncio.run(main())


def find(sequence: list[int], block: list[int], after: int = 0) -> int:
    """Where ``block`` first occurs in ``sequence`` at or after ``after`` (-1: nowhere). Blocks of
    images with the same tile layout hold the same ids: only their pixels differ."""
    for start in range(after, len(sequence) - len(block) + 1):
        if sequence[start:start + len(block)] == block:
            return start
    return -1


def test_image_blocks_sit_where_the_processor_puts_them_with_mask_zero(vision):
    model, tokenizer, processor = vision
    engine = ScriptThenModel(HFEngine(model, tokenizer), tokenizer, [ZOOM])
    trajectory = run_one(engine, tokenizer, max_turns=2)
    assert trajectory.status != "template_error", trajectory.metadata.get("error")

    # The prompt is what the processor makes of the rendered conversation with the image item.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = processor(text=[text], images=[[picture()]], add_special_tokens=False)["input_ids"][0]
    assert trajectory.prompt_ids == list(expected)
    assert trajectory.prompt_ids.count(processor.image_token_id) == 5 * processor.image_seq_len  # 2x2 tiles + global

    # The zoom's block follows the tool's text inside the observation, every token of it masked.
    zoomed = picture().crop((0, 0, 48, 32)).resize((96, 64), Image.Resampling.LANCZOS)
    block, _ = process_image(processor, zoomed)
    start = find(trajectory.response_ids, block)  # the prompt is not part of the response
    assert start > 0 and set(trajectory.loss_mask[start:start + len(block)]) == {0}
    span = next(s for s in trajectory.turns if s.start <= start < s.end)
    assert span.role == "observation" and span.turn == 0 and start + len(block) <= span.end
    assert trajectory.response_ids.count(processor.image_token_id) == len([i for i in block if i == processor.image_token_id])
    assert [(r.turn, r.width, r.height) for r in trajectory.images] == [(-1, 96, 64), (0, 96, 64)]
    trajectory.validate()


def test_tool_image_of_turn_two_is_in_the_model_input_of_turn_three(vision):
    model, tokenizer, processor = vision
    engine = ScriptThenModel(HFEngine(model, tokenizer), tokenizer, [ZOOM, CROP])
    trajectory = run_one(engine, tokenizer)
    assert len(engine.requests) == 3 and trajectory.num_turns == 3, trajectory.metadata.get("error")
    ids, images = engine.requests[2]

    # Turn 3's request holds the prompt image, turn 1's zoom and turn 2's crop of the zoom, in order.
    zoomed = picture().crop((0, 0, 48, 32)).resize((96, 64), Image.Resampling.LANCZOS)
    cropped = zoomed.crop((16, 12, 64, 48))
    assert len(images) == 3 and list(images.images[2].getdata()) == list(cropped.getdata())
    block, tensors = process_image(processor, cropped)
    assert digest(images.tensors[2]) == digest(tensors)
    zoom_block = process_image(processor, zoomed)[0]
    zoom_at = find(ids, zoom_block, len(trajectory.prompt_ids))
    assert zoom_at > 0 and find(ids, block, zoom_at + len(zoom_block)) > zoom_at
    assert ids.count(processor.image_token_id) == sum(
        int(t["pixel_attention_mask"].shape[0]) * processor.image_seq_len for t in images.tensors)

    # The model's output at turn 3 depends on the crop's pixels: other pixels, other logprobs.
    other = process_image(processor, Image.new("RGB", cropped.size, (0, 128, 0)))[1]
    assert other["pixel_values"].shape == tensors["pixel_values"].shape

    async def score(inputs):
        engine = HFEngine(model, tokenizer)
        try:
            return (await engine.generate(ids, SamplingParams(max_new_tokens=1, temperature=0.0), images=inputs)).logprobs
        finally:
            await engine.close()

    same = asyncio.run(score(images))
    changed = asyncio.run(score(ImageInputs(images.images, images.tensors[:2] + [other])))
    assert abs(same[0] - changed[0]) > 1e-4

    # And the trainer, scoring turn 3 with the stored images, gets the engine's logprobs.
    batch = collate([trajectory], tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs = forward_response(model, batch).logprobs[0]
    turn3 = next(s for s in trajectory.turns if s.role == "assistant" and s.turn == 2)
    assert torch.allclose(logprobs[turn3.start:turn3.end], torch.tensor(trajectory.logprobs[turn3.start:turn3.end]),
                          atol=1e-4)


def test_forward_on_a_stored_trajectory_reproduces_the_engines_logprobs(vision, tmp_path):
    model, tokenizer, processor = vision
    env = PictureEnv()
    worker = RolloutWorker(HFEngine(model, tokenizer), tokenizer, env, ToolExecutor(["image"]),
                           RolloutConfig(group_size=3, max_turns=1, max_new_tokens=12, max_response_tokens=64))

    async def main():
        try:
            return await worker.run_batch([env.make_task({"id": "p0"}, 0)], seed=5)
        finally:
            await worker.engine.close()

    trajectories = asyncio.run(main()).trajectories
    assert all(len(t.images) == 1 and t.num_model_tokens > 0 for t in trajectories)
    write_jsonl(trajectories, tmp_path / "inline.jsonl")
    store_images_by_reference(trajectories, tmp_path / "images", base_dir=tmp_path)
    write_jsonl(trajectories, tmp_path / "by_reference.jsonl")
    assert len(list((tmp_path / "images").glob("*.png"))) == 1  # one image, seen by all three, written once
    records = [json.loads(line)["images"][0] for line in (tmp_path / "by_reference.jsonl").read_text().splitlines()]
    assert all(r["data"] is None and r["path"].startswith("images/") for r in records)

    for name in ("inline.jsonl", "by_reference.jsonl"):
        stored = list(read_jsonl(tmp_path / name))  # no cached tensors: restored from the stored image
        for trajectory in stored:
            trajectory_image_inputs(trajectory, processor, base_dir=tmp_path)
        batch = collate(stored, tokenizer.pad_token_id)
        with torch.no_grad():
            logprobs = forward_response(model, batch).logprobs
        mask = batch.loss_mask.bool()
        assert torch.allclose(logprobs[mask], batch.sampling_logprobs[mask], atol=1e-4)

    # Without the images the same ids score differently: the pixels are part of what is reproduced.
    batch.image_inputs = [ImageInputs([], [process_image(processor, picture(seed=40))[1]]) for _ in stored]
    with torch.no_grad():
        assert not torch.allclose(forward_response(model, batch).logprobs[mask], batch.sampling_logprobs[mask], atol=1e-4)


def test_a_stored_image_that_no_longer_gives_the_engines_inputs_is_refused(vision, tmp_path):
    model, tokenizer, processor = vision
    trajectory = run_one(ScriptThenModel(HFEngine(model, tokenizer), tokenizer, []), tokenizer, max_turns=1)
    record = trajectory.to_dict()
    buffer = io.BytesIO()
    picture(seed=3).save(buffer, format="PNG")  # the square moved by three pixels
    record["images"][0]["data"] = base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(ValueError, match="no longer processes to the inputs the engine saw"):
        trajectory_image_inputs(Trajectory.from_dict(record), processor)


def test_a_trajectory_over_its_image_budget_is_truncated_with_a_stop_reason(vision):
    model, tokenizer, _ = vision
    engine = ScriptThenModel(HFEngine(model, tokenizer), tokenizer, [ZOOM, CROP])
    trajectory = run_one(engine, tokenizer, max_images=2)  # the prompt's image and the zoom fit, the crop does not
    assert (trajectory.stop_reason, trajectory.status) == ("max_images", "truncated")
    assert len(trajectory.images) == 2 and len(engine.requests) == 2
    assert [c.tool for c in trajectory.tool_calls] == ["image", "image"]  # the crop ran; its image was not shown
    assert trajectory.turns[-1].role == "assistant"  # nothing was appended after the last turn
    trajectory.validate()

    pixels = run_one(ScriptThenModel(HFEngine(model, tokenizer), tokenizer, [ZOOM]), tokenizer,
                     max_image_pixels=96 * 64 + 100)
    assert (pixels.stop_reason, len(pixels.images)) == ("max_images", 1)
    prompt = run_one(ScriptThenModel(HFEngine(model, tokenizer), tokenizer, []), tokenizer, max_images=0)
    assert (prompt.stop_reason, prompt.response_ids) == ("max_images", [])


# The form of SmolVLM's own template: every message's content is a list of items (string content
# would render as nothing), roles capitalised, no system prompt of its own.
CONTENT_LIST_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def test_a_template_that_reads_only_content_lists_gets_every_message_as_one():
    model, tokenizer = load_model("tiny-smolvlm")  # a tokenizer of its own: its template is changed here
    tokenizer.chat_template = CONTENT_LIST_TEMPLATE
    processor = processor_for(tokenizer)
    trajectory = run_one(ScriptThenModel(HFEngine(model.eval(), tokenizer), tokenizer, [ZOOM]), tokenizer, max_turns=2)
    assert trajectory.num_turns == 2, trajectory.metadata.get("error")
    prompt = tokenizer.decode(trajectory.prompt_ids)
    assert prompt.startswith("<|im_start|>User: <fake_token_around_image>") and "What colour is the square?" in prompt
    observation = tokenizer.decode(trajectory.response_ids)
    assert "<end_of_utterance>\nTool: image 1: zoom -> 96x64<fake_token_around_image>" in observation
    assert observation.count("<global-img>") == 1 and "Assistant:" in observation
    zoomed = picture().crop((0, 0, 48, 32)).resize((96, 64), Image.Resampling.LANCZOS)
    assert find(trajectory.response_ids, process_image(processor, zoomed)[0]) > 0


def test_gigpo_anchor_states_tell_apart_observations_that_differ_only_in_pixels():
    from agentrl.trainer.batching import turn_anchor_keys
    from agentrl.trajectory import ImageRecord

    def trajectory(prompt_digest, tool_digest):
        t = Trajectory(id="t", group_id="g", prompt_ids=[1, 2, 3])
        t.append_model_tokens([4, 5], [-1.0, -1.0], 0, 0)
        t.append_observation_tokens([6, 7], 0)
        t.append_model_tokens([8], [-1.0], 1, 0)
        t.images = [ImageRecord(-1, 8, 8, inputs_sha256=prompt_digest), ImageRecord(0, 8, 8, inputs_sha256=tool_digest)]
        return turn_anchor_keys(t)

    same, other_prompt, other_tool = trajectory("a", "b"), trajectory("c", "b"), trajectory("a", "d")
    assert same == trajectory("a", "b")
    assert other_prompt[0] != same[0] and other_prompt[1] == same[1]  # the first turn answers the prompt's image
    assert other_tool[0] == same[0] and other_tool[1] != same[1]  # the second answers the tool's image


def test_the_policy_loss_reaches_the_vision_tower_through_the_tool_images(vision):
    model, tokenizer, _ = vision
    trajectory = run_one(ScriptThenModel(HFEngine(model, tokenizer), tokenizer, [ZOOM, CROP]), tokenizer)
    batch = collate([trajectory], tokenizer.pad_token_id)
    turn3 = torch.zeros_like(batch.loss_mask)  # only the tokens the model sampled after seeing the crop
    span = next(s for s in trajectory.turns if s.role == "assistant" and s.turn == 2)
    turn3[0, span.start:span.end] = 1.0
    model.zero_grad(set_to_none=True)
    loss = -(forward_response(model, batch).logprobs * turn3).sum()
    loss.backward()
    vision_grads = [p.grad for p in model.model.vision_model.parameters()]
    assert all(g is not None for g in vision_grads) and sum(float(g.abs().sum()) for g in vision_grads) > 0
    model.zero_grad(set_to_none=True)


def test_the_image_placeholder_is_never_sampled_and_the_trainer_scores_it_out_alike(vision):
    import copy

    model, tokenizer, processor = vision
    model = copy.deepcopy(model)

    def next_token_logits(batch):  # the unmasked logits after the prompt
        images = model_inputs([t for row in batch.image_inputs for t in row.tensors])
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                     **images).logits[0, batch.prompt_width - 1]

    probe = run_one(ScriptThenModel(HFEngine(model, tokenizer), tokenizer, []), tokenizer, max_turns=1, max_new_tokens=1)
    with torch.no_grad():  # make <image> by far the policy's favourite first token
        favourite = int(next_token_logits(collate([probe], tokenizer.pad_token_id)).argmax())
        model.lm_head.weight[processor.image_token_id] = model.lm_head.weight[favourite] * 50
    trajectories = [run_one(ScriptThenModel(HFEngine(model, tokenizer), tokenizer, []), tokenizer, max_turns=1,
                            temperature=t) for t in (1.0, 0.0)]
    batch = collate(trajectories, tokenizer.pad_token_id)
    with torch.no_grad():
        assert int(next_token_logits(batch).argmax()) == processor.image_token_id  # unmasked, it would be picked
        logprobs = forward_response(model, batch).logprobs
    for trajectory in trajectories:
        sampled = [i for i, m in zip(trajectory.response_ids, trajectory.loss_mask) if m]
        assert len(sampled) == 64 and processor.image_token_id not in sampled
    mask = batch.loss_mask.bool()
    assert torch.allclose(logprobs[mask], batch.sampling_logprobs[mask], atol=1e-4)


class CancelledAt(ScriptThenModel):
    """Cancels the request with this index, as a partial-rollout step ends a run at an await."""

    def __init__(self, engine, tokenizer, actions, cancel_at: int):
        super().__init__(engine, tokenizer, actions)
        self.cancel_at = cancel_at

    async def generate(self, prompt_ids, params, images=None):
        if len(self.requests) == self.cancel_at:
            raise asyncio.CancelledError
        return await super().generate(prompt_ids, params, images)


def test_a_carried_trajectory_keeps_its_images_through_a_checkpoint(vision):
    from agentrl.partial import Group

    model, tokenizer, processor = vision

    def worker(engine):
        config = RolloutConfig(group_size=1, max_turns=3, max_new_tokens=64, max_response_tokens=600)
        return RolloutWorker(engine, tokenizer, PictureEnv(), ToolExecutor(["image"]), config)

    first = worker(CancelledAt(HFEngine(model, tokenizer), tokenizer, [ZOOM], cancel_at=1))
    task = PictureEnv().make_task({"id": "p0"}, 0)
    run = first.new_run(task, 0, seed=3)
    with pytest.raises(asyncio.CancelledError):  # the step ends after the zoom was shown, before turn 2
        asyncio.run(first.advance(run))
    assert (run.turn, len(run.trajectory.images)) == (1, 2)
    first.partial.carried = [Group(task, [run])]
    state = json.loads(json.dumps(first.state_dict()))  # the checkpoint: no tensors, no PIL images

    engine = ScriptThenModel(HFEngine(model, tokenizer), tokenizer, [CROP])
    second = worker(engine)
    second.load_state_dict(state)
    resumed = second.partial.carried[0].runs[0]
    asyncio.run(second.advance(resumed))
    trajectory = resumed.trajectory
    assert trajectory.num_turns == 3 and trajectory.trainable, trajectory.metadata.get("error")
    # the crop of turn 2 worked on the zoom of turn 1 (image -1), restored from the checkpoint
    zoomed = picture().crop((0, 0, 48, 32)).resize((96, 64), Image.Resampling.LANCZOS)
    ids, images = engine.requests[-1]
    assert len(images) == 3 and list(images.images[2].getdata()) == list(zoomed.crop((16, 12, 64, 48)).getdata())
    assert [r.inputs_sha256 for r in trajectory.images[:2]] == [r["inputs_sha256"] for r in
                                                              state["groups"][0]["runs"][0]["trajectory"]["images"]]
    batch = collate([trajectory], tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs = forward_response(model, batch).logprobs[0]
    span = next(s for s in trajectory.turns if s.role == "assistant" and s.turn == 2)
    assert torch.allclose(logprobs[span.start:span.end], torch.tensor(trajectory.logprobs[span.start:span.end]), atol=1e-4)
