"""The default recipe, the on-policy GRPO/PPO family, and the contract every recipe follows.

One training step is these parts in order (``agentrl.trainer.local.train_step`` calls them)::

    trajectories, m = recipe.collect(step)                 # rollouts of the step's tasks
    m |= recipe.score(trajectories, step)                  # reward terms on top of the env's
    trainable, extra, m = recipe.select(trajectories, step)  # filters, refills (their rollouts: extra)
    parts, m = recipe.loss_batches(trainable, step)        # [on-policy batch, further batches...]
    m |= update(run, parts, step)                          # the loss on each batch, optimizer steps
    m |= recipe.after_update(parts, step)                  # bookkeeping on what the update used
    recipe.state_dict() / load_state_dict()                # exact resume of whatever the recipe keeps

A method overrides the parts it changes and nothing else: Dr.BoT ``select`` and ``loss_batches``
(its group filter and row masks), SPEAR also ``score`` (the tool-call reward), ``loss_batches``
(the replay batch) and ``after_update`` (the buffer).
"""

from __future__ import annotations

from typing import Any

import torch

from agentrl.algos import advantages as adv
from agentrl.trainer.batching import collate
from agentrl.trainer.estimators import groups_with_signal
from agentrl.trainer.update import LossBatch
from agentrl.trajectory import Trajectory


class Recipe:
    """The on-policy step of the GRPO/PPO family: rollouts of ``prompts_per_step`` tasks (with
    partial rollouts if enabled), the env's reward, DAPO dynamic sampling and the overlong filter
    if configured, one loss batch for the configured estimator and loss."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.config = run.config

    # -- the parts ------------------------------------------------------------------------------

    def collect(self, step: int) -> tuple[list[Trajectory], dict[str, float]]:
        """The step's rollouts and their metrics."""
        rollout, new_tasks = self.run.loop.run_until_complete(collect_rollout(self.run, step))
        metrics = {**rollout.metrics, **tool_use_metrics(rollout.trajectories)}
        if self.config.rollout.partial.enabled:
            metrics["partial/new_tasks"] = float(new_tasks)
        return rollout.trajectories, metrics

    def score(self, trajectories: list[Trajectory], step: int) -> dict[str, float]:
        """Reward terms on top of the env's reward (which the rollout already set); none here."""
        return {}

    def select(self, trajectories: list[Trajectory], step: int) -> tuple[list[Trajectory], list[Trajectory], dict[str, float]]:
        """The trajectories that train, any further trajectories drawn to refill the batch, and metrics."""
        trainable = [t for t in trajectories if t.trainable and t.reward is not None]
        if not self.config.algo.dynamic_sampling:
            return trainable, [], {}
        return self.refill_with_signal(trainable, step)

    def loss_batches(self, trainable: list[Trajectory], step: int) -> tuple[list[LossBatch], dict[str, float]]:
        """One on-policy loss batch (with the overlong filter's mask if configured)."""
        if not trainable:
            return [], {}
        batch = collate(trainable, self.run.tokenizer.pad_token_id, self.run.engine.policy_version)
        metrics = {}
        if self.config.algo.overlong_filter:
            batch.loss_mask = adv.overlong_filter(batch.loss_mask, batch.truncated)
            metrics["filter/overlong_fraction"] = float(batch.truncated.float().mean())
        return [LossBatch(batch, trainable)], metrics

    def after_update(self, parts: list[LossBatch], step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # -- shared pieces ---------------------------------------------------------------------------

    def refill_with_signal(self, trainable: list[Trajectory], step: int) -> tuple[list[Trajectory], list[Trajectory], dict[str, float]]:
        """DAPO dynamic sampling (Yu et al. 2025, sec. 3.2): keep the groups with signal and draw more
        prompts, at most ``algo.dynamic_sampling_max_draws`` further rounds, until ``prompts_per_step``
        groups are kept; then keep exactly that many. The refills are scored like the step's rollouts."""
        run, config, target = self.run, self.config, self.config.trainer.prompts_per_step
        kept = groups_with_signal(trainable, config.algo)
        metrics = {"filter/kept_fraction": len(kept) / max(len(trainable), 1)}
        extra, draws = [], 0
        while len({t.group_id for t in kept}) < target and draws < config.algo.dynamic_sampling_max_draws:
            draws += 1
            seed = step_seed(config, step) + 500 + draws  # within this step's seed block
            rollout = run.loop.run_until_complete(run.worker.run_batch(next_tasks(run), seed=seed))
            self.score(rollout.trajectories, step)
            extra.extend(rollout.trajectories)
            kept.extend(groups_with_signal([t for t in rollout.trajectories if t.trainable and t.reward is not None],
                                           config.algo))
        groups = set(list(dict.fromkeys(t.group_id for t in kept))[:target])
        kept = [t for t in kept if t.group_id in groups]
        metrics.update({"filter/extra_draws": float(draws), "filter/groups": float(len(groups))})
        return kept, extra, metrics


def step_seed(config, step: int) -> int:
    """The first sampling seed of ``step``'s block: each step owns 1000 seeds."""
    return (config.trainer.seed * 10_000 + step) * 1_000


def next_tasks(run: Any, count: int | None = None) -> list[Any]:
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


async def collect_rollout(run: Any, step: int):
    """The step's rollout and how many new tasks it drew. With partial rollouts (APRIL) the pool is
    over-provisioned (the carried groups plus new tasks up to ``over_provision * prompts_per_step``),
    the step ends once ``prompts_per_step`` groups are complete and the rest carry into the next step."""
    seed = step_seed(run.config, step)
    if not run.config.rollout.partial.enabled:
        return await run.worker.run_batch(next_tasks(run), seed=seed), run.config.trainer.prompts_per_step
    target = run.config.trainer.prompts_per_step
    tasks = next_tasks(run, run.worker.partial.tasks_needed(target))
    batch = await run.worker.run_batch(tasks, seed=seed, target_groups=target)
    if hasattr(run.engine, "drain"):  # the cancelled requests' rows leave the decode thread before the update
        await run.engine.drain()
    return batch, len(tasks)


def tool_use_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    if not trajectories:
        return {}
    calls = [c for t in trajectories for c in t.tool_calls if c.tool]
    return {
        "tool_calls_per_trajectory": len(calls) / len(trajectories),
        "tool_use_rate": sum(any(c.tool for c in t.tool_calls) for t in trajectories) / len(trajectories),
    }
