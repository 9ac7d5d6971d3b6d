"""What the benchmarks share: a training run in a child process, and writing a benchmark's section
into BENCHMARKS.md."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def train_in_child(config: dict, output_dir: Path) -> tuple[list[dict], float]:
    """``agentrl train`` on ``config`` in a fresh ``output_dir`` (its config written there), in a child
    process; returns the rows of its metrics.jsonl and the wall time in seconds."""
    config = {**config, "output_dir": str(output_dir)}
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    path = output_dir / "bench-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "agentrl.cli", "train", str(path)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    wall_s = time.perf_counter() - started
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows, wall_s


def write_section(path: Path, begin: str, end: str, section: str) -> None:
    """Replace the text between the ``begin`` and ``end`` markers with ``section`` (which holds
    both markers), or append it when the file has no such section yet."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
