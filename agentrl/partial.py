"""Partial rollouts (APRIL): over-provision, stop at the target, carry the rest over.

A step launches more groups than it needs (the groups carried over from the previous step plus the
new tasks; a trainer asks :meth:`PartialRolloutManager.tasks_needed` how many new tasks fill the pool
to ``over_provision`` times the target). As soon as ``target_groups`` groups are complete, every
in-flight generation and tool call is cancelled and the unfinished trajectories are kept exactly as
far as they got: whole turns with the policy version of each assistant span. The next step continues
them with the new policy. A trajectory holding tokens more than ``max_staleness`` versions older
than the current policy is dropped with its whole group (stop reason ``stale`` for the runs not
done, ``metadata["dropped"]`` for the others; never trained on): a group baseline over the samples
that happened to finish early would be biased towards short trajectories. Only complete groups with
something left to train count towards the target.

A trajectory cancelled while its tools ran keeps its assistant turn and runs those calls again when
it continues, in a new tool session: tools that keep session state (a python interpreter) start
fresh, which the model sees as a restarted session.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
from dataclasses import dataclass, fields
from typing import Any, Protocol

from agentrl.config import PartialRolloutConfig
from agentrl.envs.base import Task
from agentrl.runs import RolloutBatch, TrajectoryRun, derive_seed
from agentrl.trajectory import Trajectory

STALE_GROUP = "another sample of this group outlived the maximum staleness"


class TrajectoryRunner(Protocol):
    """What partial rollouts need of a rollout worker (:class:`agentrl.rollout.RolloutWorker`)."""

    engine: Any

    def new_run(self, task: Task, sample: int, seed: int) -> TrajectoryRun: ...

    async def advance(self, run: TrajectoryRun) -> None: ...

    def finish(self, run: TrajectoryRun) -> None: ...


@dataclass
class Group:
    """The samples of one task; complete when every sample is done."""

    task: Task
    runs: list[TrajectoryRun]

    @property
    def complete(self) -> bool:
        return all(run.done for run in self.runs)

    @property
    def counts(self) -> bool:
        """Complete with at least one trajectory to train on: counts towards a step's target."""
        return self.complete and any(run.trajectory.trainable for run in self.runs)


class PartialRolloutManager:
    def __init__(self, worker: TrajectoryRunner, config: PartialRolloutConfig) -> None:
        self.worker = worker
        self.config = config
        self.carried: list[Group] = []

    def tasks_needed(self, target_groups: int) -> int:
        """How many new tasks bring the pool to ``over_provision * target_groups`` groups."""
        return max(0, math.ceil(target_groups * self.config.over_provision) - len(self.carried))

    async def run_step(self, tasks: list[Task], seed: int, group_size: int,
                       target_groups: int | None = None) -> RolloutBatch:
        """Run the carried groups and ``tasks`` until ``target_groups`` (default ``len(tasks)``)
        groups count (:attr:`Group.counts`); the batch holds every complete group's trajectories
        and the step's ``partial/*`` metrics (the rollout worker adds the rest)."""
        target = target_groups if target_groups is not None else len(tasks)
        worker = self.worker
        carried, self.carried = self.carried, []
        groups = carried + [
            Group(task, [worker.new_run(task, i, derive_seed(seed, index, i)) for i in range(group_size)])
            for index, task in enumerate(tasks)
        ]
        resumed, stale = self._drop_stale(carried)
        running = {asyncio.ensure_future(worker.advance(run)): group
                   for group in groups for run in group.runs if not run.done}
        try:
            while running and sum(g.counts for g in groups) < target:
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for future in finished:
                    running.pop(future)
                    future.result()  # a trajectory that crashed fails the step
        finally:
            for future in running:
                future.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            # Kept even when the step fails: the pool is not lost with it.
            self.carried = [g for g in groups if not g.complete]
        complete = [g for g in groups if g.complete]
        trajectories = [run.trajectory for group in complete for run in group.runs]
        return RolloutBatch(trajectories, {
            "partial/groups_complete": float(sum(g.counts for g in complete)),
            "partial/groups_carried": float(len(self.carried)),
            "partial/trajectories_resumed": float(resumed),
            "partial/trajectories_stale": float(stale),
        })

    def _drop_stale(self, carried: list[Group]) -> tuple[int, int]:
        """Finish every group holding a run older than ``max_staleness`` versions; returns how many
        runs resume and how many were dropped as stale."""
        version, resumed, stale = self.worker.engine.policy_version, 0, 0
        for group in carried:
            ages = [version - run.oldest_version for run in group.runs if not run.done and run.oldest_version is not None]
            if not any(age > self.config.max_staleness for age in ages):
                resumed += len(ages)
                continue
            for run in group.runs:
                if run.done:
                    run.trajectory.metadata["dropped"] = STALE_GROUP
                    continue
                run.trajectory.stop_reason = "stale"
                self.worker.finish(run)
                stale += 1
        return resumed, stale

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the carried groups with their tasks and every run's progress."""
        return {"groups": [
            {"task": _task_to_dict(group.task), "runs": [_run_to_dict(run) for run in group.runs]}
            for group in self.carried
        ]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carried = []
        for group in state.get("groups", []):
            task = _task_from_dict(group["task"])
            self.carried.append(Group(task, [_run_from_dict(task, data) for data in group["runs"]]))


# Every field of a run but its task (saved once per group) and trajectory (saved as its own dict).
_RUN_FIELDS = tuple(f.name for f in fields(TrajectoryRun) if f.name not in ("task", "trajectory"))


def _run_to_dict(run: TrajectoryRun) -> dict[str, Any]:
    return {"trajectory": run.trajectory.to_dict(), **{name: getattr(run, name) for name in _RUN_FIELDS}}


def _run_from_dict(task: Task, data: dict[str, Any]) -> TrajectoryRun:
    return TrajectoryRun(task, Trajectory.from_dict(data["trajectory"]),
                         **{name: data[name] for name in _RUN_FIELDS if name in data})


def _task_to_dict(task: Task) -> dict[str, Any]:
    data = {f.name: getattr(task, f.name) for f in fields(task)}
    data["images"] = [_encode_image(image) for image in task.images]
    return data


def _task_from_dict(data: dict[str, Any]) -> Task:
    data = dict(data)
    data["images"] = [_decode_image(text) for text in data.get("images", [])]
    return Task(**data)


def _encode_image(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode_image(text: str) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image
