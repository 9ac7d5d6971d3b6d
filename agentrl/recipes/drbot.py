"""Dr.BoT, SPEAR's "bag of tricks" GRPO baseline (arXiv 2509.22601, sec. 4), as a recipe.

On top of the default step it changes two parts:

- ``select``: the group filter keeps the ``drbot.group_keep_ratio`` of groups with the largest
  reward std, then a seeded random subset of their rows of a power-of-two size
  (:func:`agentrl.algos.drbot.group_std_filter`);
- ``loss_batches``: rows flagged overlong, incomplete, repetitive (one n-gram repeated) or
  unreadable keep their reward and their place in the group baseline, but leave the loss
  (:func:`agentrl.algos.drbot.masked_rows_loss_mask`).

The rest of Dr.BoT is settings (configs/drbot.yaml): no KL, clip 0.2/0.28, dual clip 10, GRPO
without the std division, the ``dr-grpo`` aggregation (docs/spear.md says why not verl's
micro-batch-scaled ``seq-mean-token-sum-norm``).
"""

from __future__ import annotations

import torch

from agentrl.algos import drbot
from agentrl.recipes.base import Recipe
from agentrl.trainer.update import LossBatch
from agentrl.trajectory import Trajectory


class DrBoTRecipe(Recipe):
    def select(self, trajectories: list[Trajectory], step: int) -> tuple[list[Trajectory], list[Trajectory], dict[str, float]]:
        trainable, extra, metrics = super().select(trajectories, step)
        options = self.config.drbot
        if not trainable or options.group_keep_ratio == 1.0:
            return trainable, extra, metrics
        groups = len({t.group_id for t in trainable})
        if int(options.group_keep_ratio * groups) == 0:  # too few groups this step to filter: keep them
            return trainable, extra, {**metrics, "drbot/filter_skipped": 1.0}
        generator = torch.Generator().manual_seed(self.config.trainer.seed * 100_057 + step)
        rewards = torch.tensor([float(t.reward) for t in trainable])
        kept, filter_metrics = drbot.group_std_filter(rewards, [t.group_id for t in trainable], options.group_keep_ratio,
                                                      generator, options.trim_to_power_of_two)
        return [trainable[i] for i in kept.tolist()], extra, {**metrics, **filter_metrics}

    def loss_batches(self, trainable: list[Trajectory], step: int) -> tuple[list[LossBatch], dict[str, float]]:
        parts, metrics = super().loss_batches(trainable, step)
        options = self.config.drbot
        if not parts or not options.masks:
            return parts, metrics
        policy = parts[0]
        flags = drbot.row_flags(policy.trajectories, self.run.tokenizer.decode, n=options.ngram,
                                threshold=options.ngram_repeats, keep_tool_callers=options.keep_tool_callers)
        policy.batch.loss_mask, mask_metrics = drbot.masked_rows_loss_mask(policy.batch.loss_mask, flags, options.masks)
        return parts, {**metrics, **mask_metrics}
