"""agentrl's registered verl trainers: verl's own v1 trainers, plus what ``agentrl_gigpo`` needs.

verl's v1 advantage step (``PPOTrainer._compute_advantage``) fetches only ``uid``,
``response_mask``, ``rm_scores``, logprobs and values from TransferQueue, and hands an estimator
only the rewards, the mask and the group ids. GiGPO's step groups need each turn's anchor state
too. The agent loop stores it with every output (:data:`agentrl.verl.algorithms.GIGPO_FIELDS`,
one value per response token); these trainers fetch those fields for the same keys, padded as
verl pads the mask, and run verl's own advantage step with them in
:func:`agentrl.verl.algorithms.gigpo_inputs`. With any other estimator they are verl's trainers
unchanged.

Registered as ``agentrl_<mode>`` for verl's modes ``sync``, ``colocate_async`` and
``separate_async`` (``trainer.v1.trainer_mode=agentrl_sync``, ...). verl keys its behaviour on
``trainer_mode`` (which replay buffer, when weights sync, the ``trainer.v1.<mode>`` section), so
:attr:`trainer_mode` reads as verl's mode. GiGPO's ``step_weight`` is ``agentrl.gigpo.step_weight``
in verl's config (``agentrl train`` sets it from ``algo.gigpo.step_weight``).
"""

from __future__ import annotations

from typing import Any

from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_colocate_async import PPOTrainerColocateAsync
from verl.trainer.ppo.v1.trainer_separate_async import PPOTrainerSeparateAsync
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from agentrl.verl import algorithms

GIGPO = "agentrl_gigpo"


class TurnFieldsTrainer:
    """The part shared by the registered trainers (mixed in before a verl trainer class)."""

    verl_mode = "sync"

    @property
    def trainer_mode(self) -> str:
        return self.verl_mode

    @trainer_mode.setter
    def trainer_mode(self, name: str) -> None:  # verl's __init__ sets it from the config
        if name not in (self.verl_mode, f"agentrl_{self.verl_mode}"):
            raise ValueError(f"trainer.v1.trainer_mode={name!r} does not name {type(self).__name__}")

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        if self.config.algorithm.adv_estimator != GIGPO:
            return super()._compute_advantage(batch, metrics)
        import transfer_queue as tq

        fields = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                 select_fields=list(algorithms.GIGPO_FIELDS))
        padded = fields.to_padded_tensor()
        section = self.config.get("agentrl") or {}
        step_weight = float((section.get("gigpo") or {}).get("step_weight", 1.0))
        with algorithms.gigpo_inputs(padded[algorithms.GIGPO_FIELDS[0]], padded[algorithms.GIGPO_FIELDS[1]],
                                     step_weight):
            return super()._compute_advantage(batch, metrics)


@register_trainer("agentrl_sync")
class AgentrlTrainerSync(TurnFieldsTrainer, PPOTrainerSync):
    verl_mode = "sync"


@register_trainer("agentrl_colocate_async")
class AgentrlTrainerColocateAsync(TurnFieldsTrainer, PPOTrainerColocateAsync):
    verl_mode = "colocate_async"


@register_trainer("agentrl_separate_async")
class AgentrlTrainerSeparateAsync(TurnFieldsTrainer, PPOTrainerSeparateAsync):
    verl_mode = "separate_async"


TRAINERS = ("agentrl_sync", "agentrl_colocate_async", "agentrl_separate_async")
