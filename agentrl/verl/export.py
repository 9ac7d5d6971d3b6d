"""Any env's data in verl's parquet schema (``agentrl export verl CONFIG --out DIR``); needs no verl.

One row per task, with the columns verl's ``RLHFDataset`` reads:

- ``prompt``: the task's chat messages (``{role, content}``, text only: an image part becomes its
  text); verl builds ``raw_prompt`` from it and filters prompts longer than
  ``data.max_prompt_length`` with it;
- ``agent_name``: ``agentrl``, so the row runs in :class:`agentrl.verl.agent_loop.AgentrlAgentLoop`;
- ``data_source``: ``agentrl/<env name>``;
- ``ability``: ``agent``;
- ``reward_model``: ``{style: "rule", ground_truth: <the task's answer as JSON>}`` (informational:
  the agent loop scores with the env's reward and hands verl the score);
- ``extra_info``: ``index`` (the row's index in its split), ``split``, ``task_id`` and
  ``agentrl_row``, the env's row as JSON, from which the agent loop rebuilds the task with the env's
  own ``make_task``, so metadata, gold answers and images are exactly the local trainer's.

``train.parquet`` holds the env's train split, ``val.parquet`` the first ``env.eval_size`` rows of
its eval split. ``agentrl.yaml`` beside them is the resolved run config the agent loop reads (with
its secrets, so it is written readable by its owner only). Paths in the env's rows (databases,
images) must resolve on every node that runs an agent-loop worker. Tasks with images are refused:
the agent loop's engine sends text only for now.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agentrl.config import RunConfig, dump_config

AGENT_NAME = "agentrl"


def message_text(content: Any) -> str:
    """A message's text: a string as it is, the text parts of a multi-part content joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def verl_rows(env: Any, rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """verl's records for ``rows`` of ``env`` (see the module docstring)."""
    records = []
    for index, row in enumerate(rows):
        task = env.make_task(row, index)
        if task.images:
            raise ValueError(f"env.name: {env.name}'s tasks carry images, and the verl backend's agent loop sends "
                             "text only for now; train vision-language agents with the local trainer")
        records.append({
            "data_source": f"agentrl/{env.name}",
            "agent_name": AGENT_NAME,
            "prompt": [{"role": str(m["role"]), "content": message_text(m.get("content", ""))} for m in task.messages],
            "ability": "agent",
            "reward_model": {"style": "rule", "ground_truth": json.dumps(task.answer, default=str)},
            "extra_info": {"index": index, "split": split, "task_id": str(task.id),
                           "agentrl_row": json.dumps(row, default=str)},
        })
    return records


def export_verl(config: RunConfig, out: str | Path) -> dict[str, Path]:
    """Write ``train.parquet``, ``val.parquet`` and ``agentrl.yaml`` into ``out``; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from agentrl.envs import get_env_class

    env = get_env_class(config.env.name)(**config.env.options)
    splits = {"train": env.load("train", config.env.train_data),
              "val": env.load("eval", config.env.eval_data)[: config.env.eval_size]}
    directory = Path(out).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, rows in splits.items():
        if not rows:
            raise ValueError(f"the env's {'eval' if split == 'val' else split} split is empty; "
                             f"set env.{'eval' if split == 'val' else split}_data")
        paths[split] = directory / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(verl_rows(env, rows, split)), paths[split])
    paths["config"] = directory / "agentrl.yaml"
    descriptor = os.open(paths["config"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(dump_config(config, redact=False))
    return paths
