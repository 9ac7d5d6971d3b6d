"""Partial rollouts (APRIL): over-provision, stop at the target, carry the rest over.

A step launches more groups than it needs (the groups carried over from the previous step plus the
new tasks; a trainer asks :meth:`PartialRolloutManager.tasks_needed` how many new tasks fill the pool
to ``over_provision`` times the target). As soon as ``target_groups`` groups are complete, every
in-flight generation and tool call is cancelled and the unfinished trajectories are kept exactly as
far as they got: whole turns with the policy version of each assistant span. The next step continues
them with the new policy. A trajectory holding tokens more than ``max_staleness`` versions older
than the current policy is dropped (stop reason ``stale``, never trained on).

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
from typing import TYPE_CHECKING, Any

from agentrl.config import PartialRolloutConfig
from agentrl.envs.base import Task
from agentrl.trajectory import Trajectory

if TYPE_CHECKING:
    from agentrl.rollout import RolloutBatch, RolloutWorker, TrajectoryRun


@dataclass
class Group:
    """The samples of one task; complete when every sample is done."""

    task: Task
    runs: list[TrajectoryRun]

    @property
    def complete(self) -> bool:
        return all(run.done for run in self.runs)


class PartialRolloutManager:
    def __init__(self, worker: RolloutWorker, config: PartialRolloutConfig) -> None:
        self.worker = worker
        self.config = config
        self.carried: list[Group] = []

    def tasks_needed(self, target_groups: int) -> int:
        """How many new tasks bring the pool to ``over_provision * target_groups`` groups."""
        return max(0, math.ceil(target_groups * self.config.over_provision) - len(self.carried))

    async def run_step(self, tasks: list[Task], seed: int, group_size: int,
                       target_groups: int | None = None) -> RolloutBatch:
        from agentrl.rollout import RolloutBatch, derive_seed, rollout_metrics

        target = target_groups if target_groups is not None else len(tasks)
        worker, version = self.worker, self.worker.engine.policy_version
        carried, self.carried = self.carried, []
        groups = carried + [
            Group(task, [worker.new_run(task, i, derive_seed(seed, index, i)) for i in range(group_size)])
            for index, task in enumerate(tasks)
        ]
        resumed = stale = 0
        for group in carried:
            for run in group.runs:
                if run.done:
                    continue
                oldest = run.oldest_version
                if oldest is not None and version - oldest > self.config.max_staleness:
                    run.trajectory.stop_reason = "stale"
                    worker.finish(run)
                    stale += 1
                elif oldest is not None:
                    resumed += 1
        running = {asyncio.ensure_future(worker.advance(run)): group
                   for group in groups for run in group.runs if not run.done}
        try:
            while running and sum(g.complete for g in groups) < target:
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for future in finished:
                    running.pop(future)
                    future.result()  # a trajectory that crashed fails the step
        finally:
            for future in running:
                future.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        complete = [g for g in groups if g.complete]
        self.carried = [g for g in groups if not g.complete]
        trajectories = [run.trajectory for group in complete for run in group.runs]
        metrics = rollout_metrics(trajectories)
        metrics.update({
            "partial/groups_complete": float(len(complete)),
            "partial/groups_carried": float(len(self.carried)),
            "partial/trajectories_resumed": float(resumed),
            "partial/trajectories_stale": float(stale),
        })
        return RolloutBatch(trajectories, metrics)

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the carried groups with their tasks and every run's progress."""
        return {"groups": [
            {"task": _task_to_dict(group.task), "runs": [
                {"trajectory": run.trajectory.to_dict(), "seed": run.seed, "turn": run.turn,
                 "tools_pending": run.tools_pending, "finish_reason": run.finish_reason, "done": run.done}
                for run in group.runs
            ]}
            for group in self.carried
        ]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from agentrl.rollout import TrajectoryRun

        self.carried = []
        for group in state.get("groups", []):
            task = _task_from_dict(group["task"])
            runs = [TrajectoryRun(task, Trajectory.from_dict(r["trajectory"]), r["seed"], r["turn"],
                                  r["tools_pending"], r["finish_reason"], r["done"]) for r in group["runs"]]
            self.carried.append(Group(task, runs))


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
