"""``agentrl train CONFIG trainer.backend=verl``: the run config as verl's command line; needs no verl.

:func:`verl_overrides` maps a :class:`~agentrl.config.RunConfig` to hydra overrides of verl 0.9.1's
``ppo_trainer`` config (model, data, group size, lengths, estimator, loss, optimiser, cluster, the
``agentrl`` agent loop); :func:`verl_command` prepends ``python -m verl.trainer.main_ppo``. What the
agent loop itself reads (env, tools, turns, per-turn tokens, timeouts) stays in the run config,
which the loop loads from ``+agentrl.config``.

Nothing is dropped silently: a setting verl cannot honour (an estimator it has no counterpart for,
the local trainer's partial rollouts, ...) is a :class:`~agentrl.config.ConfigError` naming the key,
and so is an entry of ``verl.overrides`` that sets a key agentrl already sets. Settings that only
tune the local trainer's process (threads, its HF engine's batch size) are listed by
:func:`local_only_settings` and do nothing on verl.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from agentrl.config import ConfigError, RunConfig

AGENT_LOOP = "agentrl"
ESTIMATORS = {  # agentrl's algo.advantage -> verl's algorithm.adv_estimator
    "grpo": "grpo", "dr_grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce_plus_plus",
    "reinforce_pp_baseline": "reinforce_plus_plus_baseline", "gae": "gae", "turn_grpo": "agentrl_turn_grpo",
    "gigpo": "agentrl_gigpo",
}
# estimators that need agentrl's registered trainer (agentrl.verl.trainer): verl's mode -> its name
TRAINER_MODES = {"sync": "agentrl_sync", "colocate_async": "agentrl_colocate_async",
                 "separate_async": "agentrl_separate_async"}
NEEDS_AGENTRL_TRAINER = ("gigpo",)
KL_TYPES = {"k1": "k1", "k2": "mse", "mse": "mse", "low_var_kl": "low_var_kl"}  # verl's "k3" is clamped
LOGGERS = {"jsonl": "console", "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# Keys of the local trainer's own process that verl does not read (defaults aside, they do nothing there).
LOCAL_ONLY = ("rollout.engine", "rollout.max_batch_size", "rollout.packed_weights", "trainer.torch_threads",
              "trainer.precision", "trainer.keep_checkpoints", "tracking.sample_trajectories", "tracking.progress",
              "tracking.plot", "rollout.group_retries")


def _value(config: RunConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _differs(config: RunConfig, key: str) -> bool:
    return _value(config, key) != _value(RunConfig(), key)


def _refuse(key: str, reason: str) -> ConfigError:
    return ConfigError(f"{key}: {reason} (trainer.backend=verl)")


def check_supported(config: RunConfig) -> None:
    """Refuse settings that verl 0.9.1 cannot honour, naming the key."""
    algo = config.algo
    if algo.advantage not in ESTIMATORS:
        reason = {"archer": "ArCHer's turn-level critic is a second model that verl does not train",
                  "reinforce": "verl 0.9.1 has no baseline-free estimator"}[algo.advantage]
        raise _refuse("algo.advantage", f"{algo.advantage!r} is not available on verl: {reason}; use one of "
                      + ", ".join(ESTIMATORS))
    unsupported = {
        "recipe": "recipes compose the local trainer's step; on verl use algo.* (SPEAR's replay needs a registered "
                  "trainer, docs/scale-out.md)",
        "rollout.engine_url": "verl serves the model itself", "rollout.engine_model": "verl serves the model itself",
        "rollout.partial.enabled": "the local trainer's partial rollouts are not verl's; pass verl's own async "
                                   "settings (trainer.v1.*) in verl.overrides",
        "algo.dynamic_sampling": "not mapped to verl's filter_groups (it filters on the summed rm_scores)",
        "algo.overlong_filter": "not mapped to verl", "algo.is_all_tokens": "not mapped to verl",
        "algo.stale_is_cap": "verl weights stale tokens with algorithm.rollout_correction (verl.overrides)",
        "algo.value_trunk_grad": "verl's critic is a separate model",
        "algo.whiten_gae": "verl always whitens GAE advantages",
        "sft.enabled": "run `agentrl sft` first and set model.name to its output",
        "trainer.deterministic": "pass actor_rollout_ref.rollout.full_determinism=true in verl.overrides",
        "model.lora.dropout": "verl's LoRA has no dropout setting", "trainer.schedule": "not mapped to verl",
    }
    for key, reason in unsupported.items():
        if _differs(config, key):
            raise _refuse(key, reason)
    if config.rollout.engine == "openai":
        raise _refuse("rollout.engine", "verl samples from its own servers (verl.rollout_name), not an external one")
    if algo.kl_coef > 0:
        kind_key = "algo.kl_reward_type" if _kl_in_reward(config) else "algo.kl_loss_type"
        if _value(config, kind_key) not in KL_TYPES:
            raise _refuse(kind_key, f"{_value(config, kind_key)!r} has no verl counterpart (verl's k3 is clamped: "
                          "use low_var_kl); use one of " + ", ".join(KL_TYPES))
    check_batch_sizes(config)


def check_batch_sizes(config: RunConfig) -> None:
    """verl's rules for batch sizes (``validate_config`` and its FSDP workers): the batch and each
    minibatch split evenly over the GPUs, a minibatch counts whole prompts and a GPU's share of one
    splits into micro-batches."""
    trainer, group, gpus = config.trainer, config.rollout.group_size, config.verl.nnodes * config.verl.n_gpus_per_node
    if trainer.minibatch_size % group:
        raise _refuse("trainer.minibatch_size", f"{trainer.minibatch_size} is not a multiple of "
                      f"rollout.group_size={group}; verl's minibatch counts prompts")
    if trainer.minibatch_size > trainer.prompts_per_step * group:
        raise _refuse("trainer.minibatch_size", f"{trainer.minibatch_size} trajectories is more than a step's "
                      f"{trainer.prompts_per_step * group}")
    if (trainer.prompts_per_step * group) % gpus:
        raise _refuse("trainer.prompts_per_step", f"a step's {trainer.prompts_per_step} x {group} trajectories do not "
                      f"split evenly over {gpus} GPUs (verl.nnodes x verl.n_gpus_per_node)")
    if trainer.minibatch_size % gpus or (trainer.minibatch_size // gpus) % trainer.micro_batch_size:
        raise _refuse("trainer.micro_batch_size", f"a minibatch of {trainer.minibatch_size} trajectories over {gpus} "
                      f"GPUs does not split into micro-batches of {trainer.micro_batch_size} per GPU")


def _kl_in_reward(config: RunConfig) -> bool:
    from agentrl.config import KL_IN_REWARD_ESTIMATORS

    algo = config.algo
    return algo.kl_in_reward if algo.kl_in_reward is not None else algo.advantage in KL_IN_REWARD_ESTIMATORS


def local_only_settings(config: RunConfig) -> list[str]:
    """Keys set away from their defaults that only the local trainer reads."""
    return [key for key in LOCAL_ONLY if _differs(config, key)]


def model_path(name: str) -> str:
    """verl loads a Hugging Face path or id; the embedded model is converted to one first."""
    from agentrl.models import EMBEDDED, resolve_model_path

    return str(resolve_model_path(name)) if name in EMBEDDED else name


def _loss(config: RunConfig) -> dict[str, Any]:
    algo, prefix = config.algo, "actor_rollout_ref.actor"
    settings: dict[str, Any] = {f"{prefix}.clip_ratio_low": algo.clip_low, f"{prefix}.clip_ratio_high": algo.clip_high}
    if algo.kl_cov_ratio > 0:  # agentrl's order: KL-Cov, then Clip-Cov, then PPO clip
        settings.update({f"{prefix}.policy_loss.loss_mode": "agentrl_kl_cov",
                         f"{prefix}.policy_loss.kl_cov_ratio": algo.kl_cov_ratio,
                         f"{prefix}.policy_loss.ppo_kl_coef": algo.kl_cov_coef})
    elif algo.clip_cov_ratio > 0:
        settings.update({f"{prefix}.policy_loss.loss_mode": "agentrl_clip_cov",
                         f"{prefix}.policy_loss.clip_cov_ratio": algo.clip_cov_ratio,
                         f"{prefix}.policy_loss.clip_cov_lb": algo.clip_cov_lower,
                         f"{prefix}.policy_loss.clip_cov_ub": algo.clip_cov_upper})
    else:
        settings.update({f"{prefix}.policy_loss.loss_mode": "agentrl_ppo_clip",
                         f"{prefix}.clip_ratio_c": algo.dual_clip if algo.dual_clip is not None else 1.0})
    if algo.loss_agg == "dr-grpo":  # 1/(G L_max) sum l: verl's seq-mean-token-sum-norm with L_max fixed
        settings.update({f"{prefix}.loss_agg_mode": "seq-mean-token-sum-norm",
                         f"{prefix}.loss_scale_factor": config.rollout.max_response_tokens})
    else:
        settings[f"{prefix}.loss_agg_mode"] = algo.loss_agg
    settings[f"{prefix}.entropy_coeff"] = algo.entropy_coef
    if algo.kl_coef > 0 and not _kl_in_reward(config):
        settings.update({f"{prefix}.use_kl_loss": True, f"{prefix}.kl_loss_coef": algo.kl_coef,
                         f"{prefix}.kl_loss_type": KL_TYPES[algo.kl_loss_type]})
    return settings


def _estimator(config: RunConfig) -> dict[str, Any]:
    algo = config.algo
    gamma = {"turn_grpo": algo.turn_gamma, "gigpo": algo.gigpo.gamma}.get(algo.advantage, algo.gamma)
    settings: dict[str, Any] = {"algorithm.adv_estimator": ESTIMATORS[algo.advantage],
                                "algorithm.norm_adv_by_std_in_grpo": algo.norm_std and algo.advantage != "dr_grpo",
                                "algorithm.gamma": gamma, "algorithm.lam": algo.lam}
    if algo.advantage == "gigpo":  # read by agentrl's trainer, which hands it to agentrl_gigpo
        settings["+agentrl.gigpo.step_weight"] = algo.gigpo.step_weight
    if algo.kl_coef > 0 and _kl_in_reward(config):
        settings.update({"algorithm.use_kl_in_reward": True, "algorithm.kl_ctrl.kl_coef": algo.kl_coef,
                         "algorithm.kl_penalty": KL_TYPES[algo.kl_reward_type]})
    if algo.advantage == "gae":  # verl's critic is its own model, started from the policy's weights
        settings.update({"critic.optim.lr": algo.value_lr, "critic.cliprange_value": algo.value_clip,
                         "critic.model.path": model_path(config.model.name),
                         "critic.ppo_micro_batch_size_per_gpu": config.trainer.micro_batch_size})
    return settings


def verl_overrides(config: RunConfig, data_dir: str | Path) -> list[str]:
    """verl's hydra overrides for ``config`` with the exported data in ``data_dir``."""
    check_supported(config)
    data, rollout, trainer = Path(data_dir).resolve(), config.rollout, config.trainer
    actor, model = "actor_rollout_ref.actor", "actor_rollout_ref.model"
    settings: dict[str, Any] = {
        "data.train_files": str(data / "train.parquet"), "data.val_files": str(data / "val.parquet"),
        "data.train_batch_size": trainer.prompts_per_step, "data.max_prompt_length": config.verl.max_prompt_length,
        "data.max_response_length": rollout.max_response_tokens, "data.seed": trainer.seed,
        f"{model}.path": model_path(config.model.name),
        f"{model}.enable_gradient_checkpointing": config.model.gradient_checkpointing,
        "actor_rollout_ref.rollout.name": config.verl.rollout_name, "actor_rollout_ref.rollout.mode": "async",
        "actor_rollout_ref.rollout.n": rollout.group_size,
        "actor_rollout_ref.rollout.temperature": rollout.temperature, "actor_rollout_ref.rollout.top_p": rollout.top_p,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": config.verl.tensor_parallel_size,
        "actor_rollout_ref.rollout.val_kwargs.temperature": trainer.eval_temperature,
        "actor_rollout_ref.rollout.val_kwargs.do_sample": trainer.eval_temperature > 0,
        "actor_rollout_ref.rollout.agent.default_agent_loop": AGENT_LOOP,
        f"{actor}.optim.lr": trainer.lr, f"{actor}.optim.weight_decay": trainer.weight_decay,
        f"{actor}.optim.betas": list(trainer.betas), f"{actor}.optim.lr_warmup_steps": trainer.warmup_steps,
        f"{actor}.grad_clip": trainer.max_grad_norm, f"{actor}.ppo_epochs": trainer.epochs,
        f"{actor}.ppo_mini_batch_size": trainer.minibatch_size // rollout.group_size,
        f"{actor}.ppo_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": trainer.micro_batch_size,
        **_loss(config), **_estimator(config),
        "trainer.total_training_steps": trainer.steps, "trainer.save_freq": trainer.save_every or -1,
        "trainer.test_freq": trainer.eval_every or -1, "trainer.val_before_train": trainer.eval_before,
        "trainer.default_local_dir": str(Path(config.output_dir).resolve() / "checkpoints"),
        "trainer.resume_mode": "auto" if config.resume else "disable",
        "trainer.project_name": config.tracking.project,
        "trainer.experiment_name": config.tracking.run_name or Path(config.output_dir).name,
        "trainer.logger": sorted({LOGGERS[b] for b in config.tracking.backends}),
        "trainer.n_gpus_per_node": config.verl.n_gpus_per_node, "trainer.nnodes": config.verl.nnodes,
        "+agentrl.config": str(data / "agentrl.yaml"),
        "hydra.run.dir": str(Path(config.output_dir).resolve() / "verl"),  # verl's own logs, in the run's directory
    }
    if rollout.dtype != "auto":  # auto: verl's own default (bfloat16 serving)
        settings["actor_rollout_ref.rollout.dtype"] = rollout.dtype
    if rollout.gpu_memory_utilization is not None:
        settings["actor_rollout_ref.rollout.gpu_memory_utilization"] = rollout.gpu_memory_utilization
    if config.model.lora.enabled:
        lora = config.model.lora
        settings.update({f"{model}.lora_rank": lora.r, f"{model}.lora_alpha": lora.alpha,
                         f"{model}.target_modules": list(lora.target_modules)})
    extras = list(enumerate(config.verl.overrides))
    if config.algo.advantage in NEEDS_AGENTRL_TRAINER:
        settings["trainer.v1.trainer_mode"], extras = agentrl_trainer_mode(config)
    overrides = [f"{key}={format_value(value)}" for key, value in settings.items()]
    set_keys = {key.lstrip("+") for key in settings}
    for index, extra in extras:
        key = extra.partition("=")[0].strip().lstrip("+~")
        if not key or "=" not in extra:
            raise ConfigError(f"verl.overrides[{index}]: {extra!r} is not key=value")
        if key in set_keys:
            raise ConfigError(f"verl.overrides[{index}]: {key} is set from the agentrl config; change the agentrl "
                              "key instead of overriding it")
        overrides.append(extra)
    return overrides


def agentrl_trainer_mode(config: RunConfig) -> tuple[str, list[tuple[int, str]]]:
    """agentrl's registered trainer for verl's ``trainer.v1.trainer_mode`` (``sync`` unless
    ``verl.overrides`` names another), and the other entries of ``verl.overrides`` with their
    indices. Its estimator (``agentrl_gigpo``) reads fields that only this trainer passes."""
    mode, rest = "sync", []
    for index, extra in enumerate(config.verl.overrides):
        key, _, value = extra.partition("=")
        if key.strip().lstrip("+") != "trainer.v1.trainer_mode":
            rest.append((index, extra))
            continue
        mode = value.strip().strip("'\"")
        if mode not in TRAINER_MODES and mode not in TRAINER_MODES.values():
            raise ConfigError(f"verl.overrides[{index}]: trainer.v1.trainer_mode={mode!r}: "
                              f"algo.advantage={config.algo.advantage} runs under agentrl's trainer, which has the "
                              "modes " + ", ".join(TRAINER_MODES))
    return TRAINER_MODES.get(mode, mode), rest


def format_value(value: Any) -> str:
    """A value in hydra's override grammar: lists as ``[a,b]``, booleans lower case, strings quoted
    when they hold characters hydra would parse."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str) and any(c in value for c in " ,=[]{}()'\"\\:$*?"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def verl_command(config: RunConfig, data_dir: str | Path) -> list[str]:
    """``[python, -m, verl.trainer.main_ppo, *overrides]``."""
    return [config.verl.python or sys.executable, "-m", "verl.trainer.main_ppo", *verl_overrides(config, data_dir)]


def data_dir(config: RunConfig) -> Path:
    return Path(config.verl.data_dir or Path(config.output_dir) / "verl_data")


def gpu_note(config: RunConfig) -> str | None:
    """A note when this machine shows no CUDA device and no Ray cluster is named: verl then waits,
    without a word, for GPUs its local cluster will never have."""
    import os

    import torch

    if torch.cuda.is_available() or os.environ.get("RAY_ADDRESS"):
        return None
    gpus = config.verl.nnodes * config.verl.n_gpus_per_node
    return (f"no CUDA device is visible here and RAY_ADDRESS is not set: verl will wait for {gpus} GPU(s) "
            "(verl.nnodes x verl.n_gpus_per_node) that its local Ray cluster does not have; use --dry-run here")


def shell_line(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)
