"""The agent loop inside a Ray worker: verl's ``AgentLoopWorker`` as a Ray actor on a local
cluster, with verl's own ``LLMServerClient`` and ``GlobalRequestLoadBalancer`` routing its requests
to a generation server that is another actor, as in a verl run (runs in the verl environment; see
tests/test_verl_env.py).

Nothing of agentrl's is registered in the worker's process by this test: the worker imports verl
when it unpickles its class, and verl's ``verl.plugins`` entry point registers the ``agentrl`` loop
there (verl's worker refuses an unregistered ``agent_name``). The one server replica is
:class:`tests.test_verl_agent_loop.HFTokenServer` (the HF engine behind verl's ``generate``
contract), since verl's vLLM/SGLang server actors need a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("verl")

import ray  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402
from verl.workers.rollout.llm_server import LLMServerClient  # noqa: E402
from verl.workers.rollout.router import GlobalRequestLoadBalancer  # noqa: E402

from agentrl.models import load_tokenizer  # noqa: E402
from agentrl.verl.export import export_verl  # noqa: E402
from agentrl.verl.launch import model_path  # noqa: E402
from tests.test_verl_agent_loop import HFTokenServer, batch_of, run_config, verl_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.mark.timeout(600)
def test_the_agent_loop_runs_inside_a_ray_worker_with_the_plugin_from_the_entry_point(cluster, tmp_path):
    config = run_config(tmp_path)
    data_dir = tmp_path / "data"
    export_verl(config, data_dir)
    verl_cfg = verl_config(config, data_dir)
    dataset = RLHFDataset(str(data_dir / "train.parquet"), load_tokenizer(verl_cfg.actor_rollout_ref.model.path),
                          verl_cfg.data)
    server = ray.remote(HFTokenServer).options(max_concurrency=8).remote(model_path("smollm2-135m-instruct"))
    balancer = ray.remote(GlobalRequestLoadBalancer).remote(servers={"hf-0": server})
    client = LLMServerClient(verl_cfg, load_balancer_handle=balancer)
    worker = ray.remote(AgentLoopWorker).remote(verl_cfg, client)
    output = ray.get(worker.generate_sequences.remote(batch_of(dataset, [0])), timeout=540)

    assert output.non_tensor_batch["agentrl_status"][0] in ("ok", "truncated")
    mask = output.batch["response_mask"][0]
    assert mask.sum() > 0 and (mask[: int(output.batch["attention_mask"][0, -mask.shape[0]:].sum())] == 0).any()
    assert len(ray.get(server.__ray_call__.remote(lambda self: self.requests))) == 2  # both turns, via the balancer
    pids = {ray.get(server.__ray_call__.remote(lambda self: os.getpid())),
            ray.get(worker.__ray_call__.remote(lambda self: os.getpid()))}
    assert os.getpid() not in pids and len(pids) == 2
