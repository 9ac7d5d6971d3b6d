"""The kill-and-resume check shared by the trainer tests: one unbroken CLI run, one killed with
SIGKILL right after a chosen checkpoint and resumed; the caller compares what they left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from agentrl.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
NOISY = ("time", "latency", "memory")


def run_cli(config: dict, path: Path) -> subprocess.Popen:
    """``agentrl train`` on ``config`` (written to ``path``) in a child process."""
    path.write_text(yaml.safe_dump(config))
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "agentrl.cli", "train", str(path)], cwd=ROOT, env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without the wall-clock ones, which differ between any two runs."""
    return [{k: v for k, v in row.items() if not any(word in k for word in NOISY)} for row in rows]


def killed_and_resumed(straight: dict, tmp_path: Path, kill_after_step: int, timeout: float = 300.0) -> tuple[Path, Path]:
    """Run ``straight`` to the end; run the same config in another directory, SIGKILL it once its
    checkpoint of ``kill_after_step`` is the latest, and resume it to the end. Asserts that the
    resumed run ends with the unbroken run's weights and metrics; returns both output directories."""
    broken = {**straight, "output_dir": str(tmp_path / "broken")}
    process = run_cli(straight, tmp_path / "straight.yaml")
    assert process.wait(timeout=timeout) == 0, process.stderr.read()

    process = run_cli(broken, tmp_path / "broken.yaml")
    pointer = tmp_path / "broken" / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while not (pointer.is_file() and pointer.read_text().strip() == f"step-{kill_after_step:06d}"):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "broken" / "checkpoints" / f"step-{kill_after_step + 1:06d}").exists()

    process = run_cli({**broken, "resume": True}, tmp_path / "resume.yaml")
    assert process.wait(timeout=timeout) == 0, process.stderr.read()
    straight_dir, broken_dir = Path(straight["output_dir"]), tmp_path / "broken"
    expected = load_file(straight_dir / "model" / "model.safetensors")
    resumed = load_file(broken_dir / "model" / "model.safetensors")
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key
    assert comparable(read_metrics(broken_dir / "metrics.jsonl")) == comparable(read_metrics(straight_dir / "metrics.jsonl"))
    return straight_dir, broken_dir
