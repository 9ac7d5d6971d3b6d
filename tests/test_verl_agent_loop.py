"""The ``agentrl`` agent loop inside verl 0.9.1's own ``AgentLoopWorker`` (runs in the verl
environment, ``.venv-verl``; see tests/test_verl_env.py).

verl's worker builds the loop per sample with ``hydra.utils.instantiate`` inside its running event
loop, exactly as in training; rows come from the exported parquet through verl's ``RLHFDataset``
and ``collate_fn``. verl's LLM servers (vLLM/SGLang Ray actors) need a GPU, so the client handed to
the worker is :class:`HFTokenServer`: verl's ``generate`` contract (token ids in, ``TokenOutput``
out, ``stop_reason`` ``completed``/``aborted`` as verl's vLLM server reports it) over agentrl's
HF engine with the real SmolLM2-135M-Instruct, greedy. The env prepends two demonstrations of a
search to the quickstart's questions, so the untrained model calls the real search tool.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("verl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from agentrl.envs.search_qa import SHORT_PROMPT, SearchQAEnv  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, AgentLoopWorker  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from agentrl.config import build_config  # noqa: E402
from agentrl.engines.base import SamplingParams  # noqa: E402
from agentrl.models import load_tokenizer  # noqa: E402
from agentrl.verl import agent_loop  # noqa: E402
from agentrl.verl.export import export_verl  # noqa: E402
from agentrl.verl.launch import model_path, verl_overrides  # noqa: E402

torch.set_num_threads(1)


class FewShotSearchQA(SearchQAEnv):
    """The quickstart's search QA with two demonstrated searches before the question."""

    name = "few_shot_search_qa"

    def make_task(self, row, index):
        task = super().make_task(row, index)
        demo = [{"role": "user", "content": SHORT_PROMPT.format(question="Who is Bob Tamsin?")},
                {"role": "assistant", "content": "<search> Bob Tamsin </search>"},
                {"role": "user", "content": SHORT_PROMPT.format(question="Who is Ann Vell?")},
                {"role": "assistant", "content": "<search> Ann Vell </search>"}]
        task.messages = demo + task.messages
        return task


class HFTokenServer:
    """verl's ``LLMServerClient.generate`` over agentrl's HF engine; records each request id."""

    def __init__(self, model_dir: str) -> None:
        from agentrl.engines.hf import HFEngine
        from agentrl.models import load_model

        model, tokenizer = load_model(model_dir)
        self.engine = HFEngine(model.eval(), tokenizer, max_batch_size=4)
        self.requests: list[tuple[str, dict]] = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None,
                       audio_data=None, mm_processor_kwargs=None, **kwargs) -> TokenOutput:
        self.requests.append((request_id, dict(sampling_params)))
        params = SamplingParams(max_new_tokens=int(sampling_params["max_tokens"]),
                                temperature=float(sampling_params.get("temperature", 1.0)),
                                top_p=float(sampling_params.get("top_p", 1.0)), stop=list(sampling_params.get("stop", [])))
        result = await self.engine.generate(list(prompt_ids), params)
        return TokenOutput(token_ids=result.token_ids,
                           log_probs=result.logprobs if sampling_params.get("logprobs") else None,
                           stop_reason="aborted" if result.finish_reason == "abort" else "completed",
                           num_preempted=0, extra_fields={"global_steps": 3})


class DownServer:
    """A server that is gone: every call fails to connect."""

    async def generate(self, request_id, **kwargs):
        raise ConnectionError("connection refused")


def run_config(tmp_path: Path):
    return build_config({
        "output_dir": str(tmp_path / "run"),
        "env": {"name": f"{__name__}:FewShotSearchQA", "eval_size": 2, "options": {"prompt": "short", "hops": 1}},
        "tools": {"names": ["search"], "options": {"search": {"topk": 1, "max_doc_chars": 240}},
                  "max_observation_tokens": 96},
        "rollout": {"group_size": 1, "max_turns": 2, "max_new_tokens": 24, "max_response_tokens": 160},
        "trainer": {"prompts_per_step": 2, "minibatch_size": 2, "micro_batch_size": 1, "eval_temperature": 0.0},
        "verl": {"max_prompt_length": 512},
    })


def verl_config(config, data_dir: Path):
    """verl's ppo_trainer config composed by hydra with the overrides agentrl generates."""
    import verl

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=[
            *verl_overrides(config, data_dir), "actor_rollout_ref.rollout.temperature=0",
            "actor_rollout_ref.rollout.agent.num_workers=1"])


def batch_of(dataset: RLHFDataset, rows: list[int]) -> DataProto:
    return DataProto.from_single_dict(collate_fn([dataset[i] for i in rows]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("verl-loop")
    config = run_config(tmp_path)
    data_dir = tmp_path / "data"
    export_verl(config, data_dir)
    verl_cfg = verl_config(config, data_dir)
    tokenizer = load_tokenizer(verl_cfg.actor_rollout_ref.model.path)
    return config, verl_cfg, RLHFDataset(str(data_dir / "train.parquet"), tokenizer, verl_cfg.data)


@pytest.fixture(scope="module")
def server(setup):
    return HFTokenServer(model_path("smollm2-135m-instruct"))


async def test_the_worker_runs_real_search_calls_with_observation_tokens_masked(setup, server):
    _, verl_cfg, dataset = setup
    worker = AgentLoopWorker(verl_cfg, server)  # in the running loop, as verl's actors build it
    server.requests.clear()
    output = await worker.generate_sequences(batch_of(dataset, [0]))

    mask, responses = output.batch["response_mask"][0], output.batch["responses"][0]
    attention = output.batch["attention_mask"][0, -responses.shape[0]:]
    length = int(attention.sum())
    tokenizer = worker.tokenizer
    runs = np.diff(np.concatenate([[0], mask[:length].numpy(), [0]]))
    assert (runs == 1).sum() == 2, "a search turn, the observation, then the next turn"
    observed = tokenizer.decode(responses[:length][mask[:length] == 0])
    assert "<information>" in observed and "Kryrkzal Vyxzyth" in observed  # the real search tool's result
    assert "<search>" in tokenizer.decode(responses[:length][mask[:length] == 1])
    assert output.non_tensor_batch["agentrl_status"][0] in ("ok", "truncated")
    # one request id for every turn of the trajectory (sticky routing), verl's sampling params kept
    assert len(server.requests) == 2 and server.requests[0][0] == server.requests[1][0]
    assert server.requests[0][1]["temperature"] == 0 and server.requests[0][1]["logprobs"] is True
    assert "</search>" in server.requests[0][1]["stop"] and server.requests[0][1]["include_stop_str_in_output"]
    # the env's reward on the last response token, logprobs of the sampled tokens only
    assert output.batch["rm_scores"][0, length - 1] == pytest.approx(0.0) and output.batch["rm_scores"][0].sum() == 0
    logprobs = output.batch["rollout_log_probs"][0, :length]
    assert (logprobs[mask[:length] == 0] == 0).all() and (logprobs[mask[:length] == 1] < 0).any()


async def test_env_tools_and_parsers_are_built_once_per_worker(setup, server):
    _, verl_cfg, dataset = setup
    agent_loop._states.clear()
    worker = AgentLoopWorker(verl_cfg, server)
    await worker.generate_sequences(batch_of(dataset, [1]))
    assert len(agent_loop._states) == 1
    state = next(iter(agent_loop._states.values()))
    first = (state.env, state.executor, state.worker.parser)
    await worker.generate_sequences(batch_of(dataset, [2]))
    assert len(agent_loop._states) == 1 and (state.env, state.executor, state.worker.parser) == first


async def test_an_unreachable_server_comes_back_with_an_all_zero_mask(setup):
    _, verl_cfg, dataset = setup
    worker = AgentLoopWorker(verl_cfg, DownServer())
    output = await worker.generate_sequences(batch_of(dataset, [0]))
    assert output.non_tensor_batch["agentrl_status"][0] == "infra_error"
    assert "unavailable" in output.non_tensor_batch["agentrl_error"][0]
    assert output.batch["response_mask"].sum() == 0 and output.batch["rm_scores"].sum() == 0


def test_per_turn_rewards_land_on_each_turn_end_of_rm_scores():
    output = agent_loop.AgentrlLoopOutput(
        prompt_ids=[1, 2], response_ids=[5, 6, 7, 8, 9, 10], response_mask=[1, 1, 0, 0, 1, 1],
        reward_score=1.0, turn_rewards=[(1, 0.2)], metrics={})
    assert isinstance(output, AgentLoopOutput)
    fields = output.as_dict()
    assert fields["rm_scores"].tolist() == pytest.approx([0, 0.2, 0, 0, 0, 1.0])
    assert "turn_rewards" not in fields and fields["response_mask"].tolist() == [1, 1, 0, 0, 1, 1]


def test_finish_reasons_are_inferred_from_the_tokens(tokenizer):
    decode = tokenizer.decode
    eos = tokenizer.eos_token_id
    stop_ids = tokenizer.encode("<search> x </search>", add_special_tokens=False)
    infer = agent_loop.finish_reason
    assert infer("completed", [5, eos], ["</search>"], 10, {eos}, decode) == ("eos", None)
    assert infer("completed", stop_ids, ["</search>"], 64, {eos}, decode) == ("stop", "</search>")
    assert infer("completed", [5] * 10, ["</search>"], 10, {eos}, decode) == ("length", None)
    assert infer("aborted", [5], [], 10, {eos}, decode) == ("abort", None)
    assert infer("completed", [5, 6], [], 10, {eos}, decode) == ("eos", None)  # another stop token


def test_the_output_fits_verls_lengths(tmp_path):
    from agentrl.trajectory import Trajectory

    trajectory = Trajectory(id="t", group_id="g", prompt_ids=list(range(600)))
    trajectory.append_model_tokens([1, 2, 3], [-0.1] * 3, 0, 0)
    trajectory.reward = 1.0
    output = agent_loop.loop_output(trajectory, agent_loop.Request("r", {}), 0, 512, 2, 0.0)
    assert output.extra_fields["agentrl_status"] == "template_error" and len(output.prompt_ids) == 512
    assert output.response_mask == [0, 0] and output.reward_score == 0.0



async def test_sglang_servers_are_asked_to_keep_the_stop_string_their_way(tokenizer):
    sent = []

    class Recorder:
        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            sent.append(sampling_params)
            return TokenOutput(token_ids=tokenizer.encode("<search> x </search>", add_special_tokens=False),
                               log_probs=None, stop_reason="completed")

    engine = agent_loop.ServerEngine(Recorder(), tokenizer, server="sglang")
    token = agent_loop._request.set(agent_loop.Request("r", {"temperature": 1.0}))
    try:
        result = await engine.generate([1, 2], SamplingParams(max_new_tokens=16, stop=["</search>"]))
    finally:
        agent_loop._request.reset(token)
    assert sent[0]["no_stop_trim"] is True and "include_stop_str_in_output" not in sent[0]
    assert (result.finish_reason, result.stop_text) == ("stop", "</search>")
    assert result.logprobs == [0.0] * len(result.token_ids)  # the server sent none
