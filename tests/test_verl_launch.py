"""``agentrl train CONFIG trainer.backend=verl``: what cannot be honoured on verl is an error naming
the key, and ``--dry-run`` prints verl's command (no verl needed; tests/test_verl_data.py composes
the command against verl's own config)."""

from __future__ import annotations

import copy

import pytest
from typer.testing import CliRunner

from agentrl.cli import app
from agentrl.config import ConfigError, build_config
from agentrl.verl.launch import local_only_settings, verl_overrides

BASE = {"model": {"name": "my-org/my-model"}, "trainer": {"backend": "verl", "minibatch_size": 8}}


def config(*dotted: str):
    return build_config(copy.deepcopy(BASE), list(dotted))  # build_config fills in nested dicts in place


def overrides(tmp_path, *dotted: str) -> list[str]:
    return verl_overrides(config(*dotted), tmp_path)


@pytest.mark.parametrize("setting,key", [
    ("algo.advantage=archer", "algo.advantage"), ("algo.advantage=reinforce", "algo.advantage"),
    ("rollout.partial.enabled=true", "rollout.partial.enabled"), ("rollout.engine=openai", "rollout.engine"),
    ("sft.enabled=true", "sft.enabled"), ("algo.dynamic_sampling=true", "algo.dynamic_sampling"),
    ("recipe=spear", "recipe"), ("trainer.minibatch_size=6", "trainer.minibatch_size"),
    ("trainer.minibatch_size=64", "trainer.minibatch_size"), ("verl.n_gpus_per_node=3", "trainer.prompts_per_step"),
    ("trainer.micro_batch_size=3", "trainer.micro_batch_size"),
])
def test_a_setting_verl_cannot_honour_is_an_error_naming_its_key(tmp_path, setting, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        overrides(tmp_path, setting)


def test_an_unclamped_k3_kl_is_refused_rather_than_mapped_to_verls_clamped_one(tmp_path):
    with pytest.raises(ConfigError, match="^algo.kl_loss_type: "):
        overrides(tmp_path, "algo.kl_coef=0.01", "algo.kl_loss_type=k3")


def test_an_extra_override_of_a_key_agentrl_sets_is_a_conflict(tmp_path):
    with pytest.raises(ConfigError, match=r"verl.overrides\[1\]: actor_rollout_ref.rollout.n is set from"):
        overrides(tmp_path, "verl.overrides=[trainer.v1.trainer_mode=colocate_async,actor_rollout_ref.rollout.n=16]")
    with pytest.raises(ConfigError, match=r"verl.overrides\[0\]: 'nonsense' is not key=value"):
        overrides(tmp_path, "verl.overrides=[nonsense]")
    assert overrides(tmp_path, "verl.overrides=[trainer.v1.trainer_mode=colocate_async]")[-1] == \
        "trainer.v1.trainer_mode=colocate_async"


def test_a_misspelt_verl_key_names_the_closest_one():
    with pytest.raises(ConfigError, match="unknown config key 'verl.nodes'; did you mean 'verl.nnodes'"):
        config("verl.nodes=2")


def test_the_overrides_carry_the_run_configs_settings(tmp_path):
    settings = dict(o.split("=", 1) for o in overrides(tmp_path, "rollout.group_size=4", "rollout.max_response_tokens=512",
                                                       "algo.advantage=turn_grpo", "algo.turn_gamma=0.8",
                                                       "verl.nnodes=2", "verl.n_gpus_per_node=8",
                                                       "trainer.minibatch_size=16", "trainer.micro_batch_size=1"))
    assert settings["actor_rollout_ref.model.path"] == "my-org/my-model"
    assert settings["actor_rollout_ref.rollout.n"] == "4" and settings["data.max_response_length"] == "512"
    assert settings["actor_rollout_ref.actor.ppo_mini_batch_size"] == "4"  # 16 trajectories = 4 prompts of 4
    assert settings["algorithm.adv_estimator"] == "agentrl_turn_grpo" and settings["algorithm.gamma"] == "0.8"
    assert (settings["trainer.nnodes"], settings["trainer.n_gpus_per_node"]) == ("2", "8")
    assert settings["actor_rollout_ref.rollout.agent.default_agent_loop"] == "agentrl"
    assert settings["+agentrl.config"] == str(tmp_path.resolve() / "agentrl.yaml")


def test_gigpo_maps_to_agentrls_estimator_under_agentrls_trainer(tmp_path):
    settings = dict(o.split("=", 1) for o in overrides(tmp_path, "algo.advantage=gigpo", "algo.gigpo.step_weight=0.5",
                                                       "algo.gigpo.gamma=0.8", "algo.norm_std=false"))
    assert settings["algorithm.adv_estimator"] == "agentrl_gigpo" and settings["algorithm.gamma"] == "0.8"
    assert settings["+agentrl.gigpo.step_weight"] == "0.5" and settings["algorithm.norm_adv_by_std_in_grpo"] == "false"
    assert settings["trainer.v1.trainer_mode"] == "agentrl_sync"  # the trainer that hands it the turn fields
    # verl's async modes run under agentrl's trainer of the same mode
    argv = overrides(tmp_path, "algo.advantage=gigpo",
                     "verl.overrides=[trainer.v1.trainer_mode=separate_async,trainer.v1.sampler.max_off_policy_threshold=2]")
    assert "trainer.v1.trainer_mode=agentrl_separate_async" in argv and "trainer.v1.trainer_mode=separate_async" not in argv
    assert argv[-1] == "trainer.v1.sampler.max_off_policy_threshold=2"
    with pytest.raises(ConfigError, match=r"^verl.overrides\[1\]: trainer.v1.trainer_mode='my_mode': .*sync"):
        overrides(tmp_path, "algo.advantage=gigpo", "verl.overrides=[a.b=1,trainer.v1.trainer_mode=my_mode]")
    with pytest.raises(ConfigError, match=r"^verl.overrides\[1\]: actor_rollout_ref.rollout.n is set from"):
        overrides(tmp_path, "algo.advantage=gigpo",
                  "verl.overrides=[trainer.v1.trainer_mode=colocate_async,actor_rollout_ref.rollout.n=16]")
    assert "trainer.v1.trainer_mode" not in dict(o.split("=", 1) for o in overrides(tmp_path, "algo.advantage=turn_grpo"))


def test_local_only_settings_are_listed():
    assert local_only_settings(config("trainer.torch_threads=2")) == ["trainer.torch_threads"]


def test_dry_run_exports_the_data_and_prints_the_command(tmp_path, tiny_model_dir):
    result = CliRunner().invoke(app, ["train", "trainer.backend=verl", f"model.name={tiny_model_dir}",
                                      "trainer.minibatch_size=8", f"output_dir={tmp_path}", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "-m verl.trainer.main_ppo \\\n  data.train_files=" in result.stdout
    assert f"actor_rollout_ref.model.path={tiny_model_dir}" in result.stdout
    assert (tmp_path / "verl_data" / "train.parquet").is_file() and (tmp_path / "verl_data" / "agentrl.yaml").is_file()
    assert oct((tmp_path / "verl_data" / "agentrl.yaml").stat().st_mode & 0o777) == "0o600"


def test_dry_run_needs_the_verl_backend(tmp_path):
    result = CliRunner().invoke(app, ["train", f"output_dir={tmp_path}", "--dry-run"])
    assert result.exit_code == 2 and "trainer.backend=verl" in result.output


def test_an_unsupported_setting_stops_the_cli_before_anything_is_written(tmp_path):
    result = CliRunner().invoke(app, ["train", "trainer.backend=verl", "algo.advantage=archer", f"output_dir={tmp_path}",
                                      "--dry-run"])
    assert result.exit_code == 2 and "algo.advantage: 'archer' is not available on verl" in result.output
    assert not (tmp_path / "verl_data").exists()


def test_an_env_whose_tasks_carry_images_is_refused_by_the_export(tmp_path):
    from agentrl.verl.export import export_verl

    with pytest.raises(ValueError, match="^env.name: visual's tasks carry images"):
        export_verl(config("env.name=visual", "env.options={train_size: 2, eval_size: 1}"), tmp_path)


def test_train_runs_the_composed_command_and_returns_its_exit_code(tmp_path, tiny_model_dir):
    recorder = tmp_path / "python"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "argv.txt"}\nexit 3\n')
    recorder.chmod(0o755)
    result = CliRunner().invoke(app, ["train", "trainer.backend=verl", f"model.name={tiny_model_dir}",
                                      "trainer.minibatch_size=8", f"output_dir={tmp_path / 'run'}",
                                      f"verl.python={recorder}"])
    assert result.exit_code == 3, result.output
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    assert argv[:2] == ["-m", "verl.trainer.main_ppo"] and f"actor_rollout_ref.model.path={tiny_model_dir}" in argv
    assert f"hydra.run.dir={tmp_path / 'run' / 'verl'}" in argv  # verl's logs go to the run, not the working directory
    assert "no CUDA device is visible here" in result.output  # this machine has none: verl would wait
