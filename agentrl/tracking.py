"""Run tracking: metrics as JSONL always; TensorBoard, W&B or MLflow when configured; a rich
progress display; sampled trajectories per step for the viewer; a PNG plot at the end.

Files under ``output_dir``: ``metrics.jsonl`` (one object per logged step, ``{"step": n, ...}``),
``samples/step-000001.jsonl`` (trajectories with their decoded segments) and ``plot.png``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from agentrl.config import TrackingConfig, redact_secrets
from agentrl.trajectory import Trajectory, read_json_lines

PLOTTED = (
    ("reward_mean", "train reward"),
    ("success_rate", "train success"),
    ("eval/success_rate", "held-out success"),
    ("tool_calls_per_trajectory", "tool calls / trajectory"),
)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}


class Tracker:
    """One per run. ``history`` is every metrics row logged so far (it goes into checkpoints)."""

    def __init__(self, config: TrackingConfig, output_dir: str | Path, total_steps: int,
                 run_config: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None,
                 console: Console | None = None) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.console = console or Console(stderr=True)
        self.history: list[dict[str, Any]] = list(history or [])
        self.metrics_path = self.output_dir / "metrics.jsonl"
        # On resume the file is rewritten from the checkpoint: rows logged after it are dropped.
        with self.metrics_path.open("w", encoding="utf-8") as handle:
            for row in self.history:
                handle.write(json.dumps(row, allow_nan=True) + "\n")
        self.run_config = redact_secrets(run_config or {})  # what trackers see: never a token or key
        self._backends = self._open_backends(self.run_config)
        self._started = time.monotonic()
        self._first_step = self.history[-1]["step"] if self.history else 0
        self._progress = None
        self._task = None
        # A live display only on a terminal; elsewhere (CI, nohup, a cluster job's log) one plain line per step.
        if config.progress and self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[summary]}"), console=self.console, transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=self._first_step, summary="")
            self._progress.start()

    # -- backends --------------------------------------------------------------------------

    def _open_backends(self, run_config: dict[str, Any]) -> dict[str, Any]:
        backends: dict[str, Any] = {}
        name = self.config.run_name or self.output_dir.name
        for backend in self.config.backends:
            try:
                if backend == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    backends[backend] = SummaryWriter(str(self.output_dir / "tensorboard"))
                elif backend == "wandb":
                    import wandb

                    backends[backend] = wandb.init(project=self.config.project, name=name, config=run_config,
                                                   dir=str(self.output_dir), resume="allow")
                elif backend == "mlflow":
                    import mlflow

                    mlflow.set_experiment(self.config.project)
                    backends[backend] = mlflow.start_run(run_name=name)
                    mlflow.log_params({k: str(v)[:250] for k, v in _flatten(run_config).items()})
            except ImportError as error:
                self.console.print(f"tracking backend '{backend}' is not installed ({error.name}); install it with: "
                                   "pip install 'agentrl[track]'. Logging to metrics.jsonl only.",
                                   style="yellow", markup=False, soft_wrap=True)
        return backends

    # -- logging ---------------------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **_finite(metrics)}
        self.history.append(row)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=True) + "\n")
        values = _finite(metrics)
        if "tensorboard" in self._backends:
            for key, value in values.items():
                self._backends["tensorboard"].add_scalar(key, value, step)
            self._backends["tensorboard"].flush()
        if "wandb" in self._backends:
            self._backends["wandb"].log(values, step=step)
        if "mlflow" in self._backends:
            import mlflow

            mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)
        self._show(step, values)

    def _show(self, step: int, values: dict[str, float]) -> None:
        parts = []
        for key, label in (("reward_mean", "reward"), ("success_rate", "success"),
                           ("tool_calls_per_trajectory", "tools/traj"), ("eval/success_rate", "eval"),
                           ("loss/policy", "loss"), ("time/step_s", "s/step")):
            if key in values:
                parts.append(f"{label} {values[key]:.3g}")
        summary = "  ".join(parts)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, summary=summary)
        else:
            self.console.print(f"step {step}/{self.total_steps}  {summary}".rstrip(), markup=False, highlight=False,
                               soft_wrap=True)

    def log_samples(self, step: int, trajectories: list[Trajectory], tokenizer, count: int | None = None) -> Path | None:
        """Write the first ``count`` trajectories of the step with their text, span by span."""
        count = self.config.sample_trajectories if count is None else count
        if count <= 0 or not trajectories:
            return None
        path = self.output_dir / "samples" / f"step-{step:06d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for trajectory in trajectories[:count]:
                record = trajectory.to_dict()
                record["prompt_text"] = tokenizer.decode(trajectory.prompt_ids)
                record["segments"] = [
                    {"role": s.role, "turn": s.turn, "text": tokenizer.decode(trajectory.response_ids[s.start:s.end])}
                    for s in trajectory.turns
                ]
                handle.write(json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n")
        return path

    def finish(self) -> Path | None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        for backend, handle in self._backends.items():
            if backend == "tensorboard":
                handle.close()
            elif backend == "wandb":
                handle.finish()
            elif backend == "mlflow":
                import mlflow

                mlflow.end_run()
        self._backends = {}
        if self.config.plot and self.history:
            return plot_metrics(self.history, self.output_dir / "plot.png")
        return None


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics file; a torn last line is skipped with a warning."""
    return list(read_json_lines(path, json.loads, "a metrics row"))


def plot_metrics(history: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Reward, success (train and held-out) and tool use over steps, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in PLOTTED if any(key in row for row in history)]
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.2), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels):
        points = [(row["step"], row[key]) for row in history if key in row]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        axis.set_title(label)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if "success" in key:
            axis.set_ylim(-0.02, 1.02)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
