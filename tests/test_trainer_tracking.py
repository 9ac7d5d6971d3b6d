"""Tracking: metrics JSONL rewritten from the checkpoint on resume, samples for the viewer, the
plot, a clear message when a configured backend is not installed, and plain log lines off a terminal."""

import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from agentrl.config import TrackingConfig
from agentrl.tracking import Tracker, plot_metrics, read_metrics
from agentrl.trajectory import Trajectory


def test_metrics_are_appended_as_jsonl_and_rewritten_on_resume(tmp_path):
    tracker = Tracker(TrackingConfig(progress=False, plot=False), tmp_path, 3)
    for step in (1, 2, 3):
        tracker.log(step, {"reward_mean": step / 10, "note": "not a number", "bad": float("nan")})
    tracker.finish()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": s, "reward_mean": s / 10} for s in (1, 2, 3)]
    # resumed from the checkpoint of step 2: the row of step 3 is dropped, then logged again
    resumed = Tracker(TrackingConfig(progress=False, plot=False), tmp_path, 3, history=rows[:2])
    resumed.log(3, {"reward_mean": 0.35})
    resumed.finish()
    assert [r["reward_mean"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.1, 0.2, 0.35]


def test_samples_hold_the_decoded_segments(tmp_path, tokenizer):
    trajectory = Trajectory(id="t", group_id="g", prompt_ids=tokenizer.encode("Question?"))
    trajectory.append_model_tokens(tokenizer.encode("<search> x </search>"), [-1.0] * len(tokenizer.encode("<search> x </search>")), 0, 0)
    trajectory.append_observation_tokens(tokenizer.encode("<information>y</information>"), 0)
    tracker = Tracker(TrackingConfig(progress=False, sample_trajectories=1), tmp_path, 1)
    path = tracker.log_samples(1, [trajectory, trajectory], tokenizer)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["prompt_text"] == "Question?"
    assert records[0]["segments"] == [{"role": "assistant", "turn": 0, "text": "<search> x </search>"},
                                      {"role": "observation", "turn": 0, "text": "<information>y</information>"}]
    assert Trajectory.from_dict({k: v for k, v in records[0].items() if k not in ("prompt_text", "segments")}).response_ids == trajectory.response_ids


def test_the_plot_is_written_at_the_end(tmp_path):
    tracker = Tracker(TrackingConfig(progress=True), tmp_path, 2, console=Console(file=open(tmp_path / "log", "w")))
    tracker.log(0, {"eval/success_rate": 0.1})
    tracker.log(1, {"reward_mean": 0.2, "success_rate": 0.2, "tool_calls_per_trajectory": 1.0})
    tracker.log(2, {"reward_mean": 0.5, "success_rate": 0.4, "eval/success_rate": 0.6})
    path = tracker.finish()
    assert path == tmp_path / "plot.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics([{"step": 1, "reward_mean": 1.0}], tmp_path / "one.png").stat().st_size > 1000


def test_a_missing_backend_is_reported_and_jsonl_still_written(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'", name="wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    log = tmp_path / "log"
    with log.open("w") as handle:
        tracker = Tracker(TrackingConfig(backends=["jsonl", "wandb"], progress=False, plot=False), tmp_path, 1,
                          console=Console(file=handle))
        tracker.log(1, {"reward_mean": 1.0})
        tracker.finish()
    assert "pip install 'agentrl[track]'" in log.read_text()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "reward_mean": 1.0}]


def test_off_a_terminal_each_step_is_one_plain_line(tmp_path):
    log = tmp_path / "log"
    with log.open("w") as handle:
        # progress=True asks for the live display; a file is not a terminal, so plain lines are printed instead
        tracker = Tracker(TrackingConfig(progress=True, plot=False), tmp_path, 3, console=Console(file=handle))
        tracker.log(1, {"reward_mean": 0.25, "success_rate": 0.5, "tool_calls_per_trajectory": 1.5,
                        "loss/policy": 0.01, "time/step_s": 12.5})
        tracker.log(2, {"reward_mean": 0.5, "success_rate": 0.75, "eval/success_rate": 0.6, "time/step_s": 11.0})
        tracker.log(3, {})
        tracker.finish()
    assert log.read_text().splitlines() == [
        "step 1/3  reward 0.25  success 0.5  tools/traj 1.5  loss 0.01  s/step 12.5",
        "step 2/3  reward 0.5  success 0.75  eval 0.6  s/step 11",
        "step 3/3",
    ]
    assert "\x1b" not in log.read_text()  # no escape codes in a log file


def test_agentrl_train_logs_plain_lines_when_stderr_is_a_file(tmp_path, tiny_model_dir):
    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "agentrl.cli", "train", f"model.name={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
            "env.name=tests.helpers.ping_env:PingEnv", "env.eval_size=4", "rollout.group_size=2", "rollout.max_turns=1",
            "rollout.max_new_tokens=6", "rollout.max_response_tokens=12", "trainer.steps=2", "trainer.prompts_per_step=2",
            "trainer.minibatch_size=4", "trainer.eval_before=false", "trainer.torch_threads=1", "sft.enabled=false",
            "tracking.plot=false"]
    with (tmp_path / "stderr").open("w") as stderr:
        completed = subprocess.run(args, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300,
                                   env={**os.environ, "PYTHONPATH": str(root)})
    log = (tmp_path / "stderr").read_text()
    assert completed.returncode == 0, log[-3000:]
    steps = [line for line in log.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/2", "2/2"], log
    assert all(" reward " in line and " s/step " in line for line in steps)
    assert "\x1b" not in log and "\r" not in log
