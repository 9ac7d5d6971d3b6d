"""The local trainer: one process, the policy on the CPU (or one GPU), the HF engine sharing its module.

``train(config)`` reads top to bottom: build the run, resume or warm-start, evaluate, then repeat
:func:`train_step` (rollout -> reward -> advantages -> PPO epochs -> new weights to the engine),
logging and checkpointing after every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import resource
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agentrl.algos import advantages as adv
from agentrl.algos import critic as critic_lib
from agentrl.algos import losses
from agentrl.config import RunConfig, dump_config
from agentrl.trainer.batching import TrainBatch, collate, forward_response
from agentrl.trainer.checkpoint import (
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_final_model,
)
from agentrl.trainer.estimators import (  # noqa: F401  (reward_kl and policy_token_loss: the module's API)
    compute_advantages,
    covariance_selected,
    groups_with_signal,
    kl_goes_in_reward,
    policy_token_loss,
    reward_kl,
    train_critic,
    uses_covariance_selection,
)
from agentrl.trainer.optim import clip_and_step
from agentrl.trainer.reference import load_reference, needs_post_sft_reference, snapshot_reference
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
    state: TrainerState = field(default_factory=TrainerState)


# -- building ------------------------------------------------------------------------------------


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

    from agentrl.engines.hf import HFEngine
    from agentrl.envs import get_env_class
    from agentrl.executor import ToolExecutor
    from agentrl.models import disable_dropout, load_model, prepare_master_weights
    from agentrl.rollout import RolloutWorker

    transformers_logging.disable_progress_bar()  # the run has its own progress display
    trainer = config.trainer
    if config.rollout.engine != "hf":
        raise ValueError(f"the local trainer samples with the HF engine that shares its module; rollout.engine="
                         f"{config.rollout.engine} is not supported here: set rollout.engine=hf")
    if trainer.torch_threads:
        torch.set_num_threads(trainer.torch_threads)
    if trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(trainer.seed)
    if model is None:
        model, tokenizer = load_model(config.model.name, config.model.dtype)
    reference = None
    if config.model.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = config.model.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
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
        value_head = torch.nn.Linear(model.config.hidden_size, 1)
        torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
        parameters.append({"params": list(value_head.parameters()), "lr": config.algo.value_lr})
    critic = None
    if config.algo.advantage == "archer":
        archer = config.algo.archer
        critic = critic_lib.CriticLearner(model.config.hidden_size, archer.hidden_size, archer.lr, archer.gamma, archer.tau,
                                          archer.batch_size, archer.buffer_size, trainer.seed)
    optimizer = torch.optim.AdamW(parameters, betas=trainer.betas, weight_decay=trainer.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(trainer.warmup_steps, trainer.steps, trainer.schedule))

    env = get_env_class(config.env.name)(**config.env.options)
    executor = ToolExecutor(config.tools.names or list(env.tools), config.tools.options,
                            config.tools.server_url, config.tools.server_token)
    engine = HFEngine(model, tokenizer, max_batch_size=config.rollout.max_batch_size)
    worker = RolloutWorker(engine, tokenizer, env, executor, config.rollout, config.tools)
    eval_rollout = config.rollout.model_copy(update={"temperature": trainer.eval_temperature})
    eval_worker = RolloutWorker(engine, tokenizer, env, executor, eval_rollout, config.tools)
    train_rows = env.load("train", config.env.train_data)
    eval_rows = env.load("eval", config.env.eval_data)[: config.env.eval_size]
    eval_tasks = [env.make_task(row, index) for index, row in enumerate(eval_rows)]
    return Run(config, model, tokenizer, engine, env, executor, worker, eval_worker, optimizer, scheduler,
               train_rows, eval_tasks, asyncio.new_event_loop(), value_head, reference, critic=critic)


def next_tasks(run: Run, count: int | None = None) -> list[Any]:
    """The next ``count`` (default ``prompts_per_step``) tasks of the training stream: the rows in a
    seeded random order, reshuffled every epoch, so that a data position alone says where a resumed
    run continues."""
    rows = run.train_rows
    count = run.config.trainer.prompts_per_step if count is None else count
    if not rows:
        raise ValueError("the training split is empty; set env.train_data")
    tasks = []
    for position in range(run.state.data_position, run.state.data_position + count):
        epoch, offset = divmod(position, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(run.config.trainer.seed * 7919 + epoch))
        task = run.env.make_task(rows[int(order[offset])], int(order[offset]))
        task.id = f"{task.id}@{position}"  # a row drawn twice in one step forms two groups
        tasks.append(task)
    run.state.data_position += count
    return tasks


# -- one step ------------------------------------------------------------------------------------


def train_step(run: Run) -> tuple[dict[str, float], list[Trajectory]]:
    """One RL step: rollout, reward (inside the rollout), filtering, advantages, update, new weights."""
    config, step = run.config, run.state.step + 1
    started = time.perf_counter()
    run.model.eval()
    rollout, new_tasks = run.loop.run_until_complete(collect(run, step))
    trajectories = rollout.trajectories
    metrics = {**rollout.metrics, **tool_use_metrics(trajectories), "time/rollout_s": time.perf_counter() - started}
    if config.rollout.partial.enabled:
        metrics["partial/new_tasks"] = float(new_tasks)

    trainable = [t for t in trajectories if t.trainable and t.reward is not None]
    if config.algo.dynamic_sampling:
        trainable, extra, sampling_metrics = refill_with_signal(run, trainable, step)
        trajectories, metrics = trajectories + extra, {**metrics, **sampling_metrics}
    batch = collate(trainable, run.tokenizer.pad_token_id, run.engine.policy_version) if trainable else None
    if batch is not None and config.algo.overlong_filter:
        batch.loss_mask = adv.overlong_filter(batch.loss_mask, batch.truncated)
        metrics["filter/overlong_fraction"] = float(batch.truncated.float().mean())
    update_started = time.perf_counter()
    if batch is not None and batch.loss_mask.sum() > 0:
        metrics.update(update_policy(run, batch, step))
    else:
        metrics["update/skipped"] = 1.0
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


async def collect(run: Run, step: int):
    """The step's rollout and how many new tasks it drew. With partial rollouts (APRIL) the pool is
    over-provisioned (the carried groups plus new tasks up to ``over_provision * prompts_per_step``),
    the step ends once ``prompts_per_step`` groups are complete and the rest carry into the next step."""
    seed = (run.config.trainer.seed * 10_000 + step) * 1_000
    if not run.config.rollout.partial.enabled:
        return await run.worker.run_batch(next_tasks(run), seed=seed), run.config.trainer.prompts_per_step
    target = run.config.trainer.prompts_per_step
    tasks = next_tasks(run, run.worker.partial.tasks_needed(target))
    batch = await run.worker.run_batch(tasks, seed=seed, target_groups=target)
    if hasattr(run.engine, "drain"):  # the cancelled requests' rows leave the decode thread before the update
        await run.engine.drain()
    return batch, len(tasks)


def refill_with_signal(run: Run, trainable: list[Trajectory], step: int) -> tuple[list[Trajectory], list[Trajectory], dict[str, float]]:
    """DAPO dynamic sampling (Yu et al. 2025, sec. 3.2): keep the groups with signal and draw more
    prompts, at most ``algo.dynamic_sampling_max_draws`` further rounds, until ``prompts_per_step``
    groups are kept; then keep exactly that many. Returns ``(kept, extra trajectories, metrics)``."""
    config, target = run.config, run.config.trainer.prompts_per_step
    kept = groups_with_signal(trainable, config.algo)
    metrics = {"filter/kept_fraction": len(kept) / max(len(trainable), 1)}
    extra, draws = [], 0
    while len({t.group_id for t in kept}) < target and draws < config.algo.dynamic_sampling_max_draws:
        draws += 1
        seed = (config.trainer.seed * 10_000 + step) * 1_000 + 500 + draws  # within this step's seed block
        rollout = run.loop.run_until_complete(run.worker.run_batch(next_tasks(run), seed=seed))
        extra.extend(rollout.trajectories)
        kept.extend(groups_with_signal([t for t in rollout.trajectories if t.trainable and t.reward is not None], config.algo))
    groups = set(list(dict.fromkeys(t.group_id for t in kept))[:target])
    kept = [t for t in kept if t.group_id in groups]
    metrics.update({"filter/extra_draws": float(draws), "filter/groups": float(len(groups))})
    return kept, extra, metrics


def release_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps large freed blocks (activations, logits
    over the vocabulary, the SFT optimizer's state) in its arenas, so without this a CPU run's
    resident memory carries one phase's high-water mark into the next."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and "libc.so" in libc:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc).malloc_trim(0)


def tool_use_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    if not trajectories:
        return {}
    calls = [c for t in trajectories for c in t.tool_calls if c.tool]
    return {
        "tool_calls_per_trajectory": len(calls) / len(trajectories),
        "tool_use_rate": sum(any(c.tool for c in t.tool_calls) for t in trajectories) / len(trajectories),
    }


def autocast(run: Run):
    if run.config.trainer.precision == "bf16":
        return torch.autocast(device_type=next(run.model.parameters()).device.type, dtype=torch.bfloat16)
    return nullcontext()


def micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def even_minibatches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``ceil(B / size)`` minibatches of near-equal size: a ragged remainder of a few trajectories
    would otherwise get a full Adam step (Adam's step size barely depends on the batch)."""
    return [chunk for chunk in torch.tensor_split(rows, max(1, math.ceil(len(rows) / size))) if len(chunk)]


def sampling_options(config: RunConfig) -> dict[str, float]:
    """Score tokens under the distribution the rollout sampled from (temperature, top-p)."""
    return {"temperature": config.rollout.temperature, "top_p": config.rollout.top_p}


@torch.no_grad()
def score_batch(run: Run, batch: TrainBatch):
    """Logprobs of the current policy before the update (PPO's pi_old), the reference's, values, and
    for ArCHer the turn-boundary features ``(state, action)``, each ``(B, K, H)``."""
    shape, sampling = batch.response_ids.shape, sampling_options(run.config)
    old, values = torch.zeros(shape), torch.zeros(shape) if run.value_head is not None else None
    reference = torch.zeros(shape) if run.config.algo.kl_coef > 0 else None
    features = None
    if run.critic is not None:
        size = (batch.size, batch.turn_mask.shape[1], run.model.config.hidden_size)
        features = (torch.zeros(size), torch.zeros(size))
    for rows in micro_batches(torch.arange(batch.size), run.config.trainer.micro_batch_size):
        sub = batch.select(rows)
        width = sub.response_ids.shape[1]
        with autocast(run):
            out = forward_response(run.model, sub, run.value_head, with_hidden=features is not None, **sampling)
            old[rows, :width] = out.logprobs
            if values is not None:
                values[rows, :width] = out.values
            if features is not None:
                state, action = critic_lib.turn_features(out.hidden, sub.token_turns, sub.turn_mask)
                features[0][rows], features[1][rows] = state, action
            if reference is not None:
                if run.reference is not None:
                    reference[rows, :width] = forward_response(run.reference, sub, **sampling).logprobs
                else:  # LoRA: the reference is the base model, the adapters switched off
                    with run.model.disable_adapter():
                        reference[rows, :width] = forward_response(run.model, sub, **sampling).logprobs
    return old, reference, values, features


def single_update(config: RunConfig, batch_size: int) -> bool:
    """Whether the update is one optimizer step on the whole batch with nothing else needing the
    pre-update policy's outputs up front (a reference model's logprobs, GAE's values)."""
    return (config.trainer.epochs == 1 and config.trainer.minibatch_size >= batch_size
            and config.algo.kl_coef == 0 and config.algo.advantage not in ("gae", "archer"))


def update_policy(run: Run, batch: TrainBatch, step: int) -> dict[str, float]:
    """PPO epochs over shuffled minibatches, gradients accumulated over micro-batches."""
    config, algo = run.config, run.config.algo
    loss_mask = batch.loss_mask
    kl_in_reward = kl_goes_in_reward(algo)
    if single_update(config, batch.size):
        # One optimizer step: the policy before the update is the one the training forward pass
        # runs, so its detached logprobs are pi_old exactly and a separate scoring pass is saved.
        old = reference = old_values = features = None
    else:
        old, reference, old_values, features = score_batch(run, batch)
    critic_metrics, turn_advantages = {}, None
    if run.critic is not None:
        critic_metrics, turn_advantages = train_critic(run, batch, features, step)
    advantages, returns = compute_advantages(batch, loss_mask, algo, old_values, reward_kl(old, reference, loss_mask, algo),
                                             turn_advantages)
    if run.critic is not None and run.critic.collections <= algo.archer.warmup_steps:
        # the actor waits for a trained critic; the policy is unchanged, so nothing it sampled turns stale
        return {**critic_metrics, "update/critic_warmup": 1.0, "update/skipped": 1.0}
    metrics = {**critic_metrics,
        "rollout/stale_fraction": float((batch.stale * loss_mask).sum() / loss_mask.sum()),
        "advantage/mean": float(adv.masked_mean(advantages, loss_mask)),
        "advantage/abs_mean": float(adv.masked_mean(advantages.abs(), loss_mask)),
    }
    mismatch = [0.0, 0.0]  # |pi_old - mu| over the fresh model tokens (first epoch), and their count
    stale_weights = [0.0, 0.0]  # the loss's importance weights summed over stale tokens (first epoch), their count
    sums: dict[str, float] = {}
    generator = torch.Generator().manual_seed(config.trainer.seed * 100_003 + step)
    run.model.train()
    # the value head (GAE) is clipped on its own budget: the policy's and the critic's gradients differ in scale
    value_parameters = list(run.value_head.parameters()) if run.value_head is not None else []
    value_ids = {id(p) for p in value_parameters}
    parameters = [p for group in run.optimizer.param_groups for p in group["params"] if id(p) not in value_ids]
    updates = minibatches = skipped = 0
    for epoch in range(config.trainer.epochs):
        order = torch.randperm(batch.size, generator=generator)
        for minibatch in even_minibatches(order, config.trainer.minibatch_size):
            totals = {"batch_tokens": float(loss_mask[minibatch].sum()),
                      "batch_sequences": losses.sequence_count(loss_mask[minibatch]),
                      "max_response_tokens": config.rollout.max_response_tokens}
            run.optimizer.zero_grad(set_to_none=True)
            selected = minibatch_covariance_selection(run, batch, minibatch, old, advantages, generator) \
                if uses_covariance_selection(algo) else None
            for rows in micro_batches(minibatch, config.trainer.micro_batch_size):
                sub = batch.select(rows)
                width = sub.response_ids.shape[1]
                mask = loss_mask[rows, :width]

                def cut(tensor, rows=rows, width=width):
                    return tensor[rows, :width]

                with autocast(run):
                    out = forward_response(run.model, sub, run.value_head, with_entropy=algo.entropy_coef > 0,
                                           value_trunk_grad=algo.value_trunk_grad, **sampling_options(config))
                old_sub = out.logprobs.detach() if old is None else cut(old)
                sampling, stale = cut(batch.sampling_logprobs), cut(batch.stale)
                if epoch == 0:
                    fresh = mask * (1 - stale)
                    mismatch[0] += float(((old_sub - sampling).abs() * fresh).sum())
                    mismatch[1] += float(fresh.sum())
                # truncated IS on the stale tokens, or (is_all_tokens) also on fresh ones whose mu differs
                # from pi_old by numerics (bf16, KV cache): rollout/logprob_mismatch measures the need
                weighted = mask if algo.is_all_tokens else stale
                is_weights = losses.stale_importance_weights(old_sub, sampling, weighted, algo.stale_is_cap)
                if epoch == 0:
                    stale_weights[0] += float((is_weights * stale * mask).sum())
                    stale_weights[1] += float((stale * mask).sum())
                token_loss, clipped = policy_token_loss(out.logprobs, old_sub, cut(advantages), mask, algo, generator,
                                                        None if selected is None else cut(selected))
                policy_loss = losses.aggregate_loss(token_loss * is_weights, mask, algo.loss_agg, **totals)
                loss = policy_loss
                # metrics are token means whatever the loss aggregation, so they stay fractions and means
                token_mean = {"batch_tokens": totals["batch_tokens"]}
                parts = {"loss/policy": policy_loss, "clip_fraction": losses.aggregate_loss(clipped, mask, **token_mean)}
                if reference is not None and not kl_in_reward:
                    kl_tokens = losses.kl_penalty(out.logprobs, cut(reference), algo.kl_loss_type, loss_mask=mask)
                    kl = losses.aggregate_loss(kl_tokens, mask, algo.loss_agg, **totals)
                    loss, parts["loss/kl"] = loss + algo.kl_coef * kl, kl
                if out.entropy is not None:
                    entropy = losses.aggregate_loss(out.entropy, mask, algo.loss_agg, **totals)
                    loss, parts["entropy"] = loss - algo.entropy_coef * entropy, losses.aggregate_loss(out.entropy.detach(), mask, **token_mean)
                if out.values is not None:
                    value = losses.aggregate_loss(losses.value_loss(out.values, cut(old_values), cut(returns), algo.value_clip),
                                                  mask, algo.loss_agg, **totals)
                    loss, parts["loss/value"] = loss + algo.value_coef * value, value
                loss.backward()
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
            grad_norm, stepped = clip_and_step(run.optimizer, parameters, config.trainer.max_grad_norm,
                                               *([value_parameters] if value_parameters else []))
            minibatches += 1
            if stepped:
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
                updates += 1
            else:
                skipped += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.model.eval()
    metrics.update({key: value / (updates if key == "grad_norm" else minibatches) for key, value in sums.items()})
    metrics["update/nonfinite_skipped"] = float(skipped)
    metrics["rollout/logprob_mismatch"] = mismatch[0] / max(mismatch[1], 1.0)
    if stale_weights[1]:
        metrics["rollout/stale_is_weight_mean"] = stale_weights[0] / stale_weights[1]
    metrics["lr"] = run.optimizer.param_groups[0]["lr"]
    metrics["update/trajectories"] = float(batch.size)
    return metrics


@torch.no_grad()
def minibatch_covariance_selection(run: Run, batch: TrainBatch, minibatch: torch.Tensor, old: torch.Tensor | None,
                                   advantages: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(B, T)``: the Clip-Cov/KL-Cov tokens of ``minibatch``, chosen from a no-grad pass of the
    current policy over the whole minibatch (so ``micro_batch_size`` stays a memory knob only)."""
    config = run.config
    current = torch.zeros(batch.response_ids.shape)
    for rows in micro_batches(minibatch, config.trainer.micro_batch_size):
        sub = batch.select(rows)
        with autocast(run):
            current[rows, : sub.response_ids.shape[1]] = forward_response(run.model, sub, **sampling_options(config)).logprobs
    anchor = current[minibatch] if old is None else old[minibatch]
    selected = torch.zeros(batch.response_ids.shape)
    selected[minibatch] = covariance_selected(current[minibatch], anchor, advantages[minibatch],
                                              batch.loss_mask[minibatch], config.algo, generator)
    return selected


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
        if run.critic is not None and extra.get("critic") is not None:
            run.critic.load_state_dict(extra["critic"])
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
    extra = {"critic": run.critic.state_dict()} if run.critic is not None else None
    save_checkpoint(run.config.output_dir, run.state, run.model, run.optimizer, run.scheduler, run.value_head,
                    partial, keep=run.config.trainer.keep_checkpoints, extra=extra)
