"""The ``agentrl`` agent loop with a vision-language policy inside verl 0.9.1 (runs in the verl
environment, ``.venv-verl``; see tests/test_verl_env.py): the loop, built with the arguments verl's
``AgentLoopWorker`` gives it, runs a trajectory whose prompt carries an image and whose image tool
returns another; each request sends verl's server the images so far as ``image_data``; the output
is verl's ``AgentLoopOutput`` with those images in ``multi_modal_data["images"]`` and every image
token of the response masked.

verl's LLM servers need a GPU, so the client is :class:`HFVisionServer`: verl's ``generate``
contract (token ids and ``image_data`` in, ``TokenOutput`` out) over agentrl's HF engine with the
tiny randomly initialised Idefics3 (SmolVLM architecture); its first answer is a scripted zoom.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from PIL import Image  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, DictConfigWrap  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from agentrl.config import build_config, dump_config  # noqa: E402
from agentrl.engines.base import SamplingParams  # noqa: E402
from agentrl.engines.hf import HFEngine  # noqa: E402
from agentrl.models import EMBEDDED_MODEL, load_tokenizer  # noqa: E402
from agentrl.multimodal import ImageInputs, build_tiny_vision_model, process_image  # noqa: E402
from agentrl.verl import agent_loop  # noqa: E402
from agentrl.verl.launch import verl_overrides  # noqa: E402
from tests.test_multimodal import ZOOM, find, picture  # noqa: E402

torch.set_num_threads(1)


class HFVisionServer:
    """verl's ``LLMServerClient.generate`` over agentrl's HF engine: the images of ``image_data``
    are processed here, as verl's vLLM server hands them to vLLM. Scripted answers come first."""

    def __init__(self, model, tokenizer, processor, actions: list[str]) -> None:
        self.engine = HFEngine(model.eval(), tokenizer)
        self.tokenizer, self.processor, self.actions = tokenizer, processor, list(actions)
        self.requests: list[tuple[str, list[int], list[Image.Image]]] = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None,
                       audio_data=None, mm_processor_kwargs=None, **kwargs) -> TokenOutput:
        self.requests.append((request_id, list(prompt_ids), list(image_data or [])))
        if self.actions:
            ids = self.tokenizer.encode(self.actions.pop(0), add_special_tokens=False)
            return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed")
        images = ImageInputs(list(image_data), [process_image(self.processor, i)[1] for i in image_data]) \
            if image_data else None
        params = SamplingParams(max_new_tokens=int(sampling_params["max_tokens"]),
                                temperature=float(sampling_params.get("temperature", 1.0)),
                                stop=list(sampling_params.get("stop", [])))
        result = await self.engine.generate(list(prompt_ids), params, images=images)
        return TokenOutput(token_ids=result.token_ids, log_probs=result.logprobs, stop_reason="completed",
                           num_preempted=0, extra_fields={})


@pytest.fixture(scope="module")
def vision():
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    model, processor = build_tiny_vision_model(tokenizer)  # attaches the processor to this tokenizer
    return model, tokenizer, processor


@pytest.fixture(scope="module")
def verl_cfg(tmp_path_factory):
    """verl's ppo_trainer config with agentrl's overrides for a run of the picture env with the image tool."""
    import os

    import verl

    tmp_path = tmp_path_factory.mktemp("verl-vision")
    config = build_config({
        "output_dir": str(tmp_path / "run"),
        "env": {"name": "tests.test_multimodal:PictureEnv"},
        "tools": {"names": ["image"]},
        "rollout": {"group_size": 1, "max_turns": 2, "max_new_tokens": 64, "max_response_tokens": 400},
        "trainer": {"prompts_per_step": 1, "minibatch_size": 1, "micro_batch_size": 1},
        "verl": {"max_prompt_length": 512},
    })
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "agentrl.yaml").write_text(dump_config(config, redact=False), encoding="utf-8")
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=[*verl_overrides(config, data_dir),
                                                             "actor_rollout_ref.rollout.temperature=0"])


async def test_images_come_back_as_multi_modal_data_with_their_tokens_masked(vision, verl_cfg):
    model, tokenizer, processor = vision
    server = HFVisionServer(model, tokenizer, processor, [ZOOM])
    agent_loop._states.clear()
    # the arguments verl's AgentLoopWorker instantiates a loop with (its processor is None for Idefics3)
    loop = agent_loop.AgentrlAgentLoop(trainer_config=DictConfigWrap(verl_cfg), server_manager=server,
                                       tokenizer=tokenizer, processor=None, dataset_cls=RLHFDataset,
                                       data_config=DictConfigWrap(verl_cfg.data))
    output = await loop.run({"temperature": 0.0}, extra_info={"agentrl_row": json.dumps({"id": "p0"}), "index": 0})

    assert isinstance(output, AgentLoopOutput) and output.extra_fields["agentrl_status"] in ("ok", "truncated"), \
        output.extra_fields
    zoomed = picture().crop((0, 0, 48, 32)).resize((96, 64), Image.Resampling.LANCZOS)
    images = output.multi_modal_data["images"]
    assert [list(i.getdata()) for i in images] == [list(picture().getdata()), list(zoomed.getdata())]
    # each turn's request carried the images so far, as verl's tool agent loop sends them
    assert [len(r[2]) for r in server.requests] == [1, 2] and server.requests[1][2][1] is images[1]
    assert server.requests[0][0] == server.requests[1][0]

    image_id = processor.image_token_id
    ids = output.prompt_ids + output.response_ids
    blocks = [process_image(processor, image)[0] for image in images]
    assert ids.count(image_id) == sum(block.count(image_id) for block in blocks)
    mask = output.response_mask
    assert all(m == 0 for token, m in zip(output.response_ids, mask) if token == image_id)
    start = find(output.response_ids, blocks[1])
    assert start > 0 and set(mask[start:start + len(blocks[1])]) == {0}  # the zoom's block, in the observation
    assert 1 in mask[start + len(blocks[1]):]  # and the model's turn after it

    fields = output.as_dict()
    assert fields["multi_modal_data"]["images"] == images
    assert fields["response_mask"].tolist() == mask


async def test_a_text_trajectory_has_no_multi_modal_data(vision):
    _, tokenizer, _ = vision
    from agentrl.trajectory import Trajectory

    trajectory = Trajectory(id="t", group_id="g", prompt_ids=[1, 2, 3])
    trajectory.append_model_tokens([4, 5], [-0.1, -0.1], 0, 0)
    output = agent_loop.loop_output(trajectory, agent_loop.Request("r", {}), 0, 512, 16, 0.0)
    assert output.multi_modal_data is None and "multi_modal_data" not in output.as_dict()
