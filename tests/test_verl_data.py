"""The exported parquet through verl's own ``RLHFDataset``, and the composed command through verl's
own hydra config (runs in the verl environment; see tests/test_verl_env.py)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

pytest.importorskip("verl")

import verl  # noqa: E402
from agentrl.envs import get_env_class  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo.utils import need_critic, need_reference_policy  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass, validate_config  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402
from verl.workers.config import ActorConfig, RolloutConfig  # noqa: E402

from agentrl.config import build_config  # noqa: E402
from agentrl.verl.export import export_verl  # noqa: E402
from agentrl.verl.launch import verl_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def compose_verl(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


@pytest.mark.parametrize("env,options", [("search_qa", {"prompt": "short", "hops": 1}),
                                         ("math_code", {"train_size": 6, "eval_size": 3})])
def test_rlhf_dataset_reads_the_export_and_the_rows_rebuild_the_envs_tasks(tmp_path, tokenizer, env, options):
    config = build_config({"env": {"name": env, "eval_size": 3, "options": options}})
    paths = export_verl(config, tmp_path)
    data_config = compose_verl(verl_overrides(config, tmp_path)).data
    train = RLHFDataset(str(paths["train"]), tokenizer, data_config)
    val = RLHFDataset(str(paths["val"]), tokenizer, data_config)
    instance = get_env_class(env)(**options)
    rows = instance.load("train")
    assert len(train) == len(rows) and len(val) == 3
    for index in (0, len(train) - 1):
        item, task = train[index], instance.make_task(rows[index], index)
        assert item["agent_name"] == "agentrl" and item["data_source"] == f"agentrl/{env}"
        assert item["index"] == index and item["extra_info"]["split"] == "train"
        assert [dict(m) for m in item["raw_prompt"]] == task.messages
        rebuilt = instance.make_task(json.loads(item["extra_info"]["agentrl_row"]), item["index"])
        assert (rebuilt.id, rebuilt.messages, rebuilt.answer, rebuilt.metadata) == \
            (task.id, task.messages, task.answer, task.metadata)
        assert json.loads(item["reward_model"]["ground_truth"]) == json.loads(json.dumps(task.answer))


VARIANTS = {
    "grpo": [],
    "turn_grpo with clip-cov, a KL loss and LoRA": [
        "algo.advantage=turn_grpo", "algo.turn_gamma=0.9", "algo.clip_cov_ratio=0.0002", "algo.kl_coef=0.01",
        "algo.kl_loss_type=k2", "model.lora.enabled=true", "algo.loss_agg=dr-grpo", "verl.nnodes=2",
        "verl.n_gpus_per_node=4", "trainer.micro_batch_size=1", "verl.rollout_name=sglang", "verl.overrides=[trainer.v1.trainer_mode=separate_async]"],
    "reinforce++ with the KL in the reward": ["algo.advantage=reinforce_pp", "algo.kl_coef=0.001", "algo.gamma=0.99"],
    "gae": ["algo.advantage=gae", "algo.dual_clip=3.0", "algo.kl_cov_ratio=0.002", "rollout.dtype=float16",
            "rollout.gpu_memory_utilization=0.35"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_dry_run_composes_against_verls_own_config(tmp_path, variant):
    from typer.testing import CliRunner

    from agentrl.cli import app

    arguments = ["train", str(ROOT / "configs" / "quickstart.yaml"), "trainer.backend=verl", "sft.enabled=false",
                 f"output_dir={tmp_path}", *VARIANTS[variant], "--dry-run"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output[-2000:]
    words = shlex.split(result.stdout.partition("-m verl.trainer.main_ppo")[2].replace("\\\n", " "))
    overrides = [word for word in words if "=" in word]
    assert len(overrides) == len(words) > 40
    config = compose_verl(overrides)
    # verl's own dataclasses accept the sections agentrl sets
    assert isinstance(omega_conf_to_dataclass(config.algorithm), AlgoConfig)
    assert isinstance(omega_conf_to_dataclass(config.actor_rollout_ref.rollout), RolloutConfig)
    assert isinstance(omega_conf_to_dataclass(config.actor_rollout_ref.actor), ActorConfig)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    assert config.actor_rollout_ref.rollout.agent.default_agent_loop == "agentrl"
    assert config.actor_rollout_ref.rollout.n == 4 and config.data.train_batch_size == 6
    assert config.data.max_response_length == 192 and config.actor_rollout_ref.actor.ppo_mini_batch_size == 6
    assert config.agentrl.config == str(tmp_path / "verl_data" / "agentrl.yaml")
    assert Path(config.data.train_files).is_file() and Path(config.agentrl.config).is_file()
    if variant.startswith("turn_grpo"):
        assert config.algorithm.adv_estimator == "agentrl_turn_grpo" and config.algorithm.gamma == 0.9
        assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "agentrl_clip_cov"
        assert config.actor_rollout_ref.actor.use_kl_loss and config.actor_rollout_ref.actor.kl_loss_type == "mse"
        assert config.actor_rollout_ref.model.lora_rank == 16
        assert config.actor_rollout_ref.actor.loss_agg_mode == "seq-mean-token-sum-norm"
        assert config.actor_rollout_ref.actor.loss_scale_factor == 192
        assert (config.trainer.nnodes, config.trainer.n_gpus_per_node) == (2, 4)
        assert config.actor_rollout_ref.rollout.name == "sglang" and config.trainer.v1.trainer_mode == "separate_async"
    if variant.startswith("reinforce"):
        assert config.algorithm.use_kl_in_reward and config.algorithm.kl_penalty == "k1"
        assert config.algorithm.adv_estimator == "reinforce_plus_plus" and config.algorithm.gamma == 0.99
    if variant == "gae":
        assert config.critic.model.path == config.actor_rollout_ref.model.path
        assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "agentrl_kl_cov"
        assert config.actor_rollout_ref.rollout.dtype == "float16"
        assert config.actor_rollout_ref.rollout.gpu_memory_utilization == 0.35
    if variant == "grpo":
        assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "agentrl_ppo_clip"
        assert config.actor_rollout_ref.rollout.dtype == "bfloat16"  # rollout.dtype=auto: verl's own default
        assert config.actor_rollout_ref.rollout.gpu_memory_utilization == 0.5  # None: verl's own default
        assert config.actor_rollout_ref.actor.clip_ratio_c == 1.0  # agentrl's default: no dual clip
