"""Evaluation: the trainer-facing ``evaluate`` and the ``agentrl eval`` / ``agentrl view`` commands."""

import asyncio
import json
import subprocess
import sys

from agentrl.envs.search_qa import SearchQAEnv

from agentrl.config import PartialRolloutConfig, RolloutConfig, ToolsConfig
from agentrl.evaluate import evaluate
from agentrl.executor import ToolExecutor
from agentrl.rollout import RolloutWorker
from agentrl.trajectory import read_jsonl
from tests.helpers.scripted import ScriptedEngine

QUESTIONS = [
    {"id": "q0", "question": "What was the profession of Laskam Glimbys?", "golden_answers": ["beekeeper"]},
    {"id": "q1", "question": "In which city was Laskam Glimbys born?", "golden_answers": ["Drournix"]},
]


def script(conversation):
    if "<information>" not in conversation.split("Question:")[-1]:
        return "<search> Laskam Glimbys </search>"
    return "<answer> beekeeper </answer>"


def test_evaluate_reports_success_tool_use_and_stop_reasons(tokenizer, tmp_path):
    env = SearchQAEnv(prompt="short")
    partial = RolloutConfig(partial=PartialRolloutConfig(enabled=True))  # evaluation never runs partially
    worker = RolloutWorker(ScriptedEngine(tokenizer, script), tokenizer, env, ToolExecutor(["search"]), partial, ToolsConfig())
    tasks = [env.make_task(q, i) for i, q in enumerate(QUESTIONS)]
    metrics = asyncio.run(evaluate(worker, tasks, samples=2, trajectories_path=tmp_path / "eval.jsonl"))
    assert metrics["trajectories"] == 4 and metrics["success_rate"] == 0.5 and metrics["tool_use_rate"] == 1.0
    assert metrics["stop/answer"] == 1.0 and metrics["tool_calls/search"] == 1.0
    assert len(list(read_jsonl(tmp_path / "eval.jsonl"))) == 4 and not worker.partial.carried


def agentrl(*args):
    return subprocess.run([sys.executable, "-m", "agentrl.cli", *args], capture_output=True, text=True, timeout=300)


def test_eval_and_view_commands_with_the_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = agentrl("eval", f"model.name={tiny_model_dir}", "env.name=math_code", "env.eval_size=3",
                     "rollout.max_new_tokens=8", "rollout.max_turns=2", f"output_dir={out}", "--samples", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "success_rate" in result.stdout and "stop/" in result.stdout
    trajectories = list(read_jsonl(out / "eval" / "trajectories.jsonl"))
    assert len(trajectories) == 6 and all(t.reward is not None for t in trajectories)
    assert json.loads((out / "eval" / "metrics.json").read_text())["trajectories"] == 6
    viewed = agentrl("view", str(out))
    assert viewed.returncode == 0 and "6 trajectories" in viewed.stdout
    assert (out / "trajectories.html").read_text().count('"role": "assistant"') >= 6
    missing = agentrl("eval", "rollout.engine=openai", f"output_dir={out}")
    assert missing.returncode == 2 and "rollout.engine_url" in missing.stderr
