"""The state that the agent loop (:mod:`agentrl.rollout`) and partial rollouts (:mod:`agentrl.partial`)
share: a trajectory in progress, a step's batch, and the per-trajectory seed. Both modules import it;
neither imports the other's internals through it."""

from __future__ import annotations

from dataclasses import dataclass, field

from agentrl.envs.base import Task
from agentrl.trajectory import Trajectory


@dataclass
class RolloutBatch:
    trajectories: list[Trajectory]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrajectoryRun:
    """One trajectory's resumable state. The loop only changes it at points where it is consistent
    (whole turns appended, tools not yet run or fully run), so a run cancelled at any ``await`` can
    continue later, in another step, with a newer policy."""

    task: Task
    trajectory: Trajectory
    seed: int
    turn: int = 0  # the next turn to generate
    tools_pending: bool = False  # the last assistant turn's tool calls have not run yet
    finish_reason: str = "stop"  # of the last generation (JSON format: decides the assistant end glue)
    done: bool = False

    @property
    def oldest_version(self) -> int | None:
        versions = [s.policy_version for s in self.trajectory.turns if s.role == "assistant" and s.policy_version is not None]
        return min(versions) if versions else None


def derive_seed(seed: int, task_index: int, sample: int) -> int:
    """A per-trajectory seed from the step seed, the task's position and the sample's index."""
    return ((seed * 1_000_003 + task_index) * 1_009 + sample) % 2**31
