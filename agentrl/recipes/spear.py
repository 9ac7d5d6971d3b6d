"""SPEAR: self-imitation with progressive exploration (Tencent Youtu, arXiv 2509.22601), as a recipe.

Dr.BoT (:mod:`agentrl.recipes.drbot`) plus three parts:

- ``score``: the tool-call reward ``lambda_tc(t) min(1, 0.1 n_tc)`` minus the invalid-action
  penalty, added to the env's outcome reward (:func:`agentrl.algos.spear.shape_rewards`); the
  outcome stays in ``trajectory.metrics["reward/outcome"]``;
- ``loss_batches``: when the buffer's trigger fires, a replay batch after the on-policy one: rows
  with advantages recalibrated against the median of recent group means, trained by the
  self-imitation loss against their collection-time logprobs at weight ``w_sil(t)``
  (:func:`agentrl.trainer.update.update_replay`);
- ``after_update``: the step's positive-advantage rows enter the buffer with the logprobs the
  update used as pi_old, and the step's group means enter the baseline memory.

The buffer, its baseline memory and its random state are the recipe's ``state_dict``: a resumed
run replays exactly what an unbroken one would. Schedules are functions of the step.
"""

from __future__ import annotations

from typing import Any

import torch

from agentrl.algos import spear
from agentrl.recipes.drbot import DrBoTRecipe
from agentrl.trainer.batching import collate
from agentrl.trainer.update import LossBatch
from agentrl.trajectory import Trajectory


class SpearRecipe(DrBoTRecipe):
    def __init__(self, run: Any) -> None:
        super().__init__(run)
        options = self.config.spear
        self.buffer = spear.ReplayBuffer(
            capacity=options.buffer_size, max_staleness=options.max_staleness, baseline_capacity=options.baseline_size,
            trigger_factor=options.trigger_factor, norm_std=options.norm_std, strict_positive=options.strict_positive,
            require_tool_call=options.require_tool_call, seed=self.config.trainer.seed)
        self.replay: spear.ReplayBatch | None = None

    def score(self, trajectories: list[Trajectory], step: int) -> dict[str, float]:
        scored = [t for t in trajectories if t.reward is not None]
        if not scored:
            return {}
        options = self.config.spear
        outcome = torch.tensor([float(t.reward) for t in scored])
        rewards, metrics = spear.shape_rewards(
            outcome, torch.tensor([spear.count_tool_call_turns(t) for t in scored]),
            torch.tensor([spear.count_invalid_actions(t) for t in scored]), step,
            schedule=options.tool_call_schedule, decay_steps=options.tool_call_steps, variant=options.tool_call_variant,
            per_call=options.tool_call_per_call, cap=options.tool_call_cap,
            invalid_action_penalty=options.invalid_action_penalty)
        for trajectory, value in zip(scored, rewards.tolist(), strict=True):
            trajectory.metrics["reward/outcome"] = float(trajectory.reward)
            trajectory.reward = float(value)
        metrics["spear/outcome_reward_mean"] = float(outcome.mean())
        metrics["spear/shaped_reward_mean"] = float(rewards.mean())
        return metrics

    def loss_batches(self, trainable: list[Trajectory], step: int) -> tuple[list[LossBatch], dict[str, float]]:
        parts, metrics = super().loss_batches(trainable, step)
        self.replay = self.buffer.draw_replay(step)
        if self.replay is not None and self.replay.size:
            batch = collate(self.replay.trajectories, self.run.tokenizer.pad_token_id, self.run.engine.policy_version)
            old, mask = self.replay.token_tensors(batch.response_ids.shape[1])
            batch.loss_mask = mask  # the mask the rows trained with when collected (after the Dr.BoT masks)
            weight = spear.sil_weight(step, self.config.spear.sil_coef, self.config.spear.sil_ramp_steps)
            parts.append(LossBatch(batch, self.replay.trajectories, name="sil", kind="replay",
                                   advantages=self.replay.advantages, old_logprobs=old, weight=weight))
        return parts, metrics

    def after_update(self, parts: list[LossBatch], step: int) -> dict[str, float]:
        policy = next((p for p in parts if p.kind == "policy"), None)
        metrics: dict[str, float] = {}
        if policy is not None and policy.advantages is not None and policy.old_logprobs is not None:
            added = self.buffer.add(step, policy.trajectories, policy.batch.rewards, policy.advantages,
                                    policy.old_logprobs, policy.batch.loss_mask)
            metrics["spear/buffer_added"] = float(added)
        else:  # nothing trained this step: only the stale rows leave
            self.buffer.drop_stale(step)
        options = self.config.spear
        metrics.update(spear.replay_metrics(self.buffer, self.replay))
        metrics.update(spear.schedule_metrics(step, tool_call_schedule=options.tool_call_schedule,
                                              tool_call_steps=options.tool_call_steps, sil_coef=options.sil_coef,
                                              sil_ramp_steps=options.sil_ramp_steps))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
