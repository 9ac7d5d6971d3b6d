"""The local trainer: one process, the policy on ``trainer.device`` (the CPU or one GPU), the HF engine
sharing its module.

``train(config)`` reads top to bottom: build the run, resume or warm-start, evaluate, then repeat
:func:`train_step` (the recipe's parts: collect -> score -> select -> loss batches -> update ->
after the update; then new weights to the engine), logging and checkpointing after every step. The
parts are the recipe's (:mod:`agentrl.recipes`), the update of each loss batch is
:mod:`agentrl.trainer.update`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agentrl.algos import critic as critic_lib
from agentrl.config import RunConfig, dump_config
from agentrl.recipes.base import next_tasks, tool_use_metrics  # noqa: F401  (next_tasks: the module's API)
from agentrl.trainer.checkpoint import (
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_final_model,
)
from agentrl.trainer.estimators import policy_token_loss, reward_kl  # noqa: F401  (the module's API)
from agentrl.trainer.optim import apply_settings
from agentrl.trainer.reference import load_reference, needs_post_sft_reference, snapshot_reference
from agentrl.trainer.update import (  # noqa: F401  (even_minibatches and the rest: the module's API)
    LossBatch,
    even_minibatches,
    minibatch_covariance_selection,
    single_update,
    update,
)
from agentrl.trajectory import Trajectory


@dataclass
class Run:
    """Everything a run holds. Built once by :func:`build_run`; the step functions read it."""

    config: RunConfig
    model: Any
    tokenizer: Any
    engine: Any
    env: Any
    executor: Any
    worker: Any
    eval_worker: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_rows: list[dict[str, Any]]
    eval_tasks: list[Any]
    loop: asyncio.AbstractEventLoop
    value_head: torch.nn.Module | None = None
    reference: Any = None  # a frozen copy of the policy RL starts from (after any SFT warm start)
    critic: Any = None  # ArCHer's utterance-level critic (agentrl.algos.critic.CriticLearner)
    recipe: Any = None  # the training step's parts (agentrl.recipes)
    state: TrainerState = field(default_factory=TrainerState)


# -- building ------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``trainer.device`` as a torch device: ``auto`` is CUDA when torch finds a CUDA device, else
    the CPU; ``cuda`` or ``cuda:N`` without that device is a :class:`~agentrl.config.ConfigError`."""
    from agentrl.config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={name}: torch finds no CUDA device here (torch {torch.__version__}, "
                              "torch.cuda.is_available() is False); set trainer.device=cpu, or auto to use CUDA "
                              "where there is one")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"trainer.device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str):
    """Linear warmup, then constant, linear decay to 0 or cosine decay to 0 (per RL step)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def build_run(config: RunConfig, model=None, tokenizer=None) -> Run:
    """Load the model (LoRA-wrapped if configured), engine, env, tools, rollout workers and optimizer."""
    from transformers.utils import logging as transformers_logging

    from agentrl.engines import build_engine
    from agentrl.envs import get_env_class
    from agentrl.executor import ToolExecutor
    from agentrl.models import disable_dropout, load_model, prepare_master_weights
    from agentrl.recipes import get_recipe_class
    from agentrl.rollout import RolloutWorker

    transformers_logging.disable_progress_bar()  # the run has its own progress display
    trainer = config.trainer
    if trainer.torch_threads:
        torch.set_num_threads(trainer.torch_threads)
    if trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(trainer.seed)
    device = resolve_device(trainer.device)
    if model is None:
        model, tokenizer = load_model(config.model.name, config.model.dtype)
    reference = None
    if config.model.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = config.model.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    # everything below is created from the model's weights on the device (the reference, the
    # optimizer state) or on it explicitly (the value head, the critic); the HF engine samples there
    model.to(device)
    try:
        prepare_master_weights(model, trainer.precision, trainer.lr)
    except ValueError as error:
        from agentrl.config import ConfigError

        raise ConfigError(str(error)) from None
    if disable_dropout(model) and config.model.lora.dropout > 0:
        warnings.warn("model.lora.dropout is set to 0 for RL: pi_old is scored without dropout, so the update must "
                      "run without it for the PPO ratio to start at 1", UserWarning, stacklevel=2)
    if config.algo.kl_coef > 0 and not config.model.lora.enabled and not config.sft.enabled:
        reference = copy.deepcopy(model).eval().requires_grad_(False)  # with SFT: taken after the warm start
    if config.algo.kl_cov_ratio > 0 and trainer.epochs == 1 and trainer.minibatch_size >= trainer.prompts_per_step * config.rollout.group_size:
        warnings.warn("algo.kl_cov_ratio acts only when a step makes several updates (its penalty |log pi - log pi_old| "
                      "is 0 at the first one): set trainer.minibatch_size below the batch or trainer.epochs > 1",
                      UserWarning, stacklevel=2)
    if config.model.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    value_head = None
    parameters = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": trainer.lr}]
    if config.algo.advantage == "gae":
        value_head = torch.nn.Linear(model.config.hidden_size, 1, device=device)
        torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
        parameters.append({"params": list(value_head.parameters()), "lr": config.algo.value_lr})
    critic = None
    if config.algo.advantage == "archer":
        archer = config.algo.archer
        critic = critic_lib.CriticLearner(model.config.hidden_size, archer.hidden_size, archer.lr, archer.gamma, archer.tau,
                                          archer.batch_size, archer.buffer_size, trainer.seed, device=device)
    optimizer = torch.optim.AdamW(parameters, betas=trainer.betas, weight_decay=trainer.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(trainer.warmup_steps, trainer.steps, trainer.schedule))

    env = get_env_class(config.env.name)(**config.env.options)
    executor = ToolExecutor(config.tools.names or list(env.tools), config.tools.options,
                            config.tools.server_url, config.tools.server_token)
    engine = build_engine(config, model, tokenizer)  # hf shares the module; vllm serves a copy it keeps in step
    worker = RolloutWorker(engine, tokenizer, env, executor, config.rollout, config.tools)
    eval_rollout = config.rollout.model_copy(update={"temperature": trainer.eval_temperature})
    eval_worker = RolloutWorker(engine, tokenizer, env, executor, eval_rollout, config.tools)
    train_rows = env.load("train", config.env.train_data)
    eval_rows = env.load("eval", config.env.eval_data)[: config.env.eval_size]
    eval_tasks = [env.make_task(row, index) for index, row in enumerate(eval_rows)]
    run = Run(config, model, tokenizer, engine, env, executor, worker, eval_worker, optimizer, scheduler,
              train_rows, eval_tasks, asyncio.new_event_loop(), value_head, reference, critic=critic)
    run.recipe = get_recipe_class(config.recipe)(run)
    return run


# -- one step ------------------------------------------------------------------------------------


def train_step(run: Run) -> tuple[dict[str, float], list[Trajectory]]:
    """One RL step, the recipe's parts in order (see :mod:`agentrl.recipes.base`): collect, score,
    select, loss batches, update, after the update; then the new weights go to the engine."""
    recipe, step = run.recipe, run.state.step + 1
    started = time.perf_counter()
    run.model.eval()
    trajectories, metrics = recipe.collect(step)
    metrics["time/rollout_s"] = time.perf_counter() - started
    metrics.update(recipe.score(trajectories, step))
    trainable, extra, selected = recipe.select(trajectories, step)
    trajectories, metrics = trajectories + extra, {**metrics, **selected}
    parts, batch_metrics = recipe.loss_batches(trainable, step)
    metrics.update(batch_metrics)
    update_started = time.perf_counter()
    if (release := getattr(run.engine, "release_memory", None)) is not None:
        release()  # what the engine keeps that this update makes stale (the HF engine's packed weights)
    metrics.update(update(run, parts, step))
    metrics.update(recipe.after_update(parts, step))
    release_memory()
    with warnings.catch_warnings():
        # The schedule counts RL steps, also those whose update was skipped (before any
        # optimizer step, torch would warn that the order looks wrong).
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        run.scheduler.step()
    if "update/skipped" not in metrics:  # a skipped update leaves the policy as it was: nothing turns stale
        run.engine.update_weights()  # the engine shares the module: the next rollout samples the new policy
    metrics["time/update_s"] = time.perf_counter() - update_started
    metrics["time/step_s"] = time.perf_counter() - started
    metrics["memory/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return metrics, trajectories


def release_memory() -> None:
    """Hand freed memory back between phases. glibc keeps large freed blocks (activations, logits
    over the vocabulary, the SFT optimizer's state) in its arenas, so without this a CPU run's
    resident memory carries one phase's high-water mark into the next; on CUDA, torch's caching
    allocator keeps them reserved in the same way."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and "libc.so" in libc:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc).malloc_trim(0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# -- evaluation ----------------------------------------------------------------------------------

EVAL_KEYS = ("success_rate", "reward_mean", "turns_mean", "response_tokens_mean", "tool_calls_per_trajectory", "tool_use_rate")


def evaluate(run: Run, prefix: str = "eval") -> dict[str, float]:
    """One sample per held-out task at ``trainer.eval_temperature`` (greedy by default)."""
    if not run.eval_tasks:
        return {}
    run.model.eval()
    started = time.perf_counter()
    batch = run.loop.run_until_complete(run.eval_worker.run_batch(run.eval_tasks, seed=run.config.trainer.seed + 17, group_size=1))
    metrics = {**batch.metrics, **tool_use_metrics(batch.trajectories)}
    result = {f"{prefix}/{key}": metrics[key] for key in EVAL_KEYS if key in metrics}
    result[f"{prefix}/time_s"] = time.perf_counter() - started
    return result


# -- the whole run -------------------------------------------------------------------------------


def train(config: RunConfig, model=None, tokenizer=None, console=None) -> TrainerState:
    """Run (or resume) a whole training run; returns the final trainer state."""
    from agentrl.tracking import Tracker

    output_dir = Path(config.output_dir)
    checkpoint = latest_checkpoint(output_dir) if config.resume else None
    if checkpoint is None and list_checkpoints(output_dir):
        raise FileExistsError(f"{output_dir} already holds checkpoints; pass resume=true to continue that run "
                              "or choose another output_dir")
    run = build_run(config, model, tokenizer)
    partial_state = None
    if checkpoint is not None:
        extra: dict[str, Any] = {}
        run.state, partial_state = load_checkpoint(checkpoint, run.model, run.optimizer, run.scheduler, run.value_head,
                                                   extra=extra)
        run.engine.policy_version = run.state.policy_version
        lrs = [config.trainer.lr] + ([config.algo.value_lr] if run.value_head is not None else [])
        changed = apply_settings(run.optimizer, run.scheduler, lrs, config.trainer.betas, config.trainer.weight_decay)
        if changed:
            warnings.warn(f"resuming {checkpoint} with other optimizer settings than it was saved with "
                          f"({'; '.join(changed)}): the run goes on with this config's", UserWarning, stacklevel=2)
        if run.critic is not None and extra.get("critic") is not None:
            run.critic.load_state_dict(extra["critic"])
        if extra.get("recipe"):
            run.recipe.load_state_dict(extra["recipe"])
        if needs_post_sft_reference(config):
            run.reference = load_reference(run)
        if partial_state is not None and hasattr(run.worker, "load_state_dict"):
            run.worker.load_state_dict(partial_state)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_config(config))
    tracker = Tracker(config.tracking, output_dir, config.trainer.steps, config.model_dump(mode="json"),
                      history=run.state.metrics, console=console)
    try:
        if checkpoint is None:
            warm_start(run, tracker)
        while run.state.step < config.trainer.steps:
            metrics, trajectories = train_step(run)
            run.state.step += 1
            step = run.state.step
            every = config.trainer.eval_every
            if every and (step % every == 0 or step == config.trainer.steps):
                metrics.update(evaluate(run))
            tracker.log(step, metrics)
            tracker.log_samples(step, trajectories, run.tokenizer)
            if config.trainer.save_every and (step % config.trainer.save_every == 0 or step == config.trainer.steps):
                save(run, tracker)
        if run.state.step == config.trainer.steps:
            save_final_model(run.model, run.tokenizer, output_dir)
    finally:
        tracker.finish()
        close_run(run)
    return run.state


def close_run(run: Run) -> None:
    """Stop the engine and tools, then cancel whatever else still waits on the run's event loop."""
    run.loop.run_until_complete(run.engine.close())
    run.loop.run_until_complete(run.executor.close())
    pending = [task for task in asyncio.all_tasks(run.loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        run.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    run.loop.run_until_complete(run.loop.shutdown_asyncgens())
    run.loop.close()


def warm_start(run: Run, tracker) -> None:
    """Before the first RL step: evaluate the untrained model, run the SFT warm start if enabled,
    and evaluate again; the result is checkpointed as step 0 so a resumed run never repeats it."""
    config = run.config
    metrics: dict[str, float] = {}
    if config.sft.enabled:
        from agentrl.trainer.sft import sft_warm_start

        if config.trainer.eval_before:
            metrics.update(evaluate(run, "eval_base"))
        metrics.update(sft_warm_start(run))
        release_memory()  # the SFT optimizer's state and activations
        run.engine.update_weights()
        if needs_post_sft_reference(config):
            run.reference = snapshot_reference(run)
    if config.trainer.eval_before:
        metrics.update(evaluate(run))
    if metrics:
        tracker.log(0, metrics)
    if config.sft.enabled and config.trainer.save_every:
        save(run, tracker)


def run_sft(config, console=None) -> dict[str, float]:
    """``agentrl sft CONFIG``: evaluate, fine-tune on demonstrations, evaluate, save to ``output_dir/model``."""
    from agentrl.tracking import Tracker
    from agentrl.trainer.sft import sft_warm_start

    run = build_run(config)
    tracker = Tracker(config.tracking.model_copy(update={"progress": False}), config.output_dir, 1,
                      config.model_dump(mode="json"), console=console)
    try:
        metrics: dict[str, float] = {}
        if config.trainer.eval_before:
            metrics.update(evaluate(run, "eval_base"))
        metrics.update(sft_warm_start(run))
        run.engine.update_weights()
        if config.trainer.eval_before:
            metrics.update(evaluate(run))
        tracker.log(0, metrics)
        save_final_model(run.model, run.tokenizer, config.output_dir)
    finally:
        tracker.finish()
        close_run(run)
    return metrics


def save(run: Run, tracker) -> None:
    run.state.metrics = list(tracker.history)
    run.state.policy_version = run.engine.policy_version
    partial = run.worker.state_dict() if hasattr(run.worker, "state_dict") else None
    extra = {"recipe": run.recipe.state_dict()}
    if run.critic is not None:
        extra["critic"] = run.critic.state_dict()
    save_checkpoint(run.config.output_dir, run.state, run.model, run.optimizer, run.scheduler, run.value_head,
                    partial, keep=run.config.trainer.keep_checkpoints, extra=extra)
