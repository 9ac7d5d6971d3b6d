"""Evaluation: run an env's held-out tasks and summarise success, reward, tool use and stop reasons.

:func:`evaluate` is what a trainer calls between steps (with its own worker, on its own event
loop); :func:`run_eval` is ``agentrl eval CONFIG``: it builds the engine (the HF engine in-process,
``rollout.engine=vllm`` (a local vLLM server of the model), or any OpenAI-compatible server with
``rollout.engine=openai rollout.engine_url=...``), the env and
its tools from a run config, and writes the trajectories as JSONL for ``agentrl view``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrl.config import RunConfig
from agentrl.envs.base import Task
from agentrl.rollout import RolloutWorker
from agentrl.trajectory import Trajectory, write_jsonl


@dataclass
class EvalResult:
    metrics: dict[str, float]
    trajectories: list[Trajectory]


def eval_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """The rollout metrics plus tool use: calls per trajectory and the share that used a tool."""
    from agentrl.rollout import rollout_metrics

    metrics = rollout_metrics(trajectories)
    if trajectories:
        calls = [c for t in trajectories for c in t.tool_calls if c.tool]
        metrics["tool_calls_per_trajectory"] = len(calls) / len(trajectories)
        metrics["tool_use_rate"] = sum(any(c.tool for c in t.tool_calls) for t in trajectories) / len(trajectories)
    return metrics


async def evaluate(worker: RolloutWorker, tasks: list[Task], seed: int = 0, samples: int = 1,
                   trajectories_path: str | Path | None = None) -> dict[str, float]:
    """``samples`` trajectories per task, never as partial rollouts; metrics, and the trajectories
    written to ``trajectories_path`` when given."""
    return (await evaluate_tasks(worker, tasks, seed, samples, trajectories_path)).metrics


async def evaluate_tasks(worker: RolloutWorker, tasks: list[Task], seed: int = 0, samples: int = 1,
                         trajectories_path: str | Path | None = None) -> EvalResult:
    started = time.perf_counter()
    batch = await worker.run_batch(tasks, seed=seed, group_size=samples, partial=False)
    metrics = eval_metrics(batch.trajectories)
    metrics["time_s"] = time.perf_counter() - started
    if trajectories_path is not None:
        write_jsonl(batch.trajectories, trajectories_path)
    return EvalResult(metrics, batch.trajectories)


def build_engine(config: RunConfig) -> tuple[Any, Any]:
    """The engine and tokenizer a config asks for. With ``rollout.engine=openai`` the tokenizer is
    ``model.name``'s, which must be the served model's tokenizer."""
    import torch

    from agentrl.models import load_model, load_tokenizer

    rollout = config.rollout
    if rollout.engine == "openai":
        if not rollout.engine_url:
            raise ValueError("rollout.engine=openai needs rollout.engine_url, e.g. http://127.0.0.1:8000")
        from agentrl.engines.openai import OpenAIEngine

        return OpenAIEngine(rollout.engine_url, rollout.engine_model), load_tokenizer(config.model.name)
    from agentrl.engines import build_engine as build_rollout_engine
    from agentrl.trainer.local import resolve_device

    if config.trainer.torch_threads:
        torch.set_num_threads(config.trainer.torch_threads)
    # the HF engine samples where the weights are (trainer.device); vLLM serves a copy of its own
    device = resolve_device(config.trainer.device) if rollout.engine == "hf" else torch.device("cpu")
    model, tokenizer = load_model(config.model.name, config.model.dtype, device=str(device))
    return build_rollout_engine(config, model.eval(), tokenizer), tokenizer


async def run_eval(config: RunConfig, samples: int = 1, engine: Any = None, tokenizer: Any = None) -> EvalResult:
    """``agentrl eval``: the env's eval split (``env.eval_size`` rows) at ``trainer.eval_temperature``;
    trajectories to ``output_dir/eval/trajectories.jsonl``, metrics to ``output_dir/eval/metrics.json``."""
    from agentrl.envs import get_env_class
    from agentrl.executor import ToolExecutor

    env = get_env_class(config.env.name)(**config.env.options)
    rows = env.load("eval", config.env.eval_data)[: config.env.eval_size]
    if not rows:
        raise ValueError("the eval split is empty; set env.eval_data or env.eval_size")
    tasks = [env.make_task(row, index) for index, row in enumerate(rows)]
    own_engine = engine is None
    if own_engine:
        engine, tokenizer = build_engine(config)
    executor = ToolExecutor(config.tools.names or list(env.tools), config.tools.options,
                            config.tools.server_url, config.tools.server_token)
    rollout = config.rollout.model_copy(update={"temperature": config.trainer.eval_temperature})
    worker = RolloutWorker(engine, tokenizer, env, executor, rollout, config.tools)
    out = Path(config.output_dir) / "eval"
    try:
        result = await evaluate_tasks(worker, tasks, config.trainer.seed, samples, out / "trajectories.jsonl")
    finally:
        await executor.close()
        if own_engine:
            await engine.close()
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=1, sort_keys=True))
    return result


def metrics_table(metrics: dict[str, float], title: str = "evaluation"):
    """A rich table: outcome, tool use and stop reasons."""
    from rich.table import Table

    table = Table("metric", "value", title=title)
    order = ["trajectories", "success_rate", "reward_mean", "turns_mean", "response_tokens_mean",
             "tool_use_rate", "tool_calls_per_trajectory", "tool_errors", "tool_latency_mean_s", "tool_latency_p95_s"]
    keys = [k for k in order if k in metrics] + sorted(
        k for k in metrics if k not in order and k.split("/")[0] in ("tool_calls", "stop", "status"))
    keys += [k for k in ("time_s",) if k in metrics]
    for key in keys:
        value = metrics[key]
        table.add_row(key, f"{value:.0f}" if key == "trajectories" else f"{value:.3f}")
    return table
