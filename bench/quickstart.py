"""The quickstart, measured: run ``agentrl train configs/quickstart.yaml`` as a child process and
record the held-out success curve (untrained, after the SFT warm start, during RL), the wall time
and the peak memory (max RSS of the training process) in BENCHMARKS.md, with the plot in docs/.

    .venv/bin/python bench/quickstart.py [--config configs/quickstart.yaml] [overrides ...]

The section between the ``quickstart`` markers in BENCHMARKS.md is replaced on each run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.record import write_section  # noqa: E402

BEGIN, END = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"


def success_curve(rows: list[dict]) -> list[tuple[str, int, float]]:
    """``(phase, step, held-out success)``: untrained, before RL (after SFT if any), then RL steps."""
    curve = []
    for row in rows:
        if "eval_base/success_rate" in row:
            curve.append(("untrained", row["step"], row["eval_base/success_rate"]))
        if "eval/success_rate" in row:
            phase = "before RL" if row["step"] == 0 else "RL"
            curve.append((phase, row["step"], row["eval/success_rate"]))
    return curve


def plot_curve(curve: list[tuple[str, int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6))
    rl = [(step, value) for phase, step, value in curve if phase != "untrained"]
    axis.plot([s for s, _ in rl], [100 * v for _, v in rl], marker="o", label="held-out success (RL)")
    base = [(step, value) for phase, step, value in curve if phase == "untrained"]
    if base:
        axis.scatter([-0.5], [100 * base[0][1]], color="gray", zorder=3, label="untrained model")
    axis.set_xlabel("RL step (0 = after the SFT warm start)")
    axis.set_ylabel("held-out success, %")
    axis.set_ylim(-2, 102)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    axis.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--output-dir", default="runs/bench-quickstart")
    parser.add_argument("--no-record", action="store_true", help="do not edit BENCHMARKS.md or docs/")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    output_dir = ROOT / args.output_dir
    if output_dir.exists():
        shutil.rmtree(output_dir)
    command = [sys.executable, "-m", "agentrl.cli", "train", args.config, f"output_dir={output_dir}", *args.overrides]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    wall_s = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20

    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = success_curve(rows)
    untrained = next((v for p, _, v in curve if p == "untrained"), None)
    before_rl = next(v for p, _, v in curve if p == "before RL")
    final = curve[-1][2]
    untrained = before_rl if untrained is None else untrained
    lines = ["phase        step  held-out success"] + [f"{p:<12} {s:>4}  {100 * v:6.1f}%" for p, s, v in curve]
    summary = (f"wall time {wall_s / 60:.1f} min, peak RSS {peak_gib:.2f} GiB; held-out success "
               f"{100 * untrained:.1f}% -> {100 * final:.1f}% (+{100 * (final - untrained):.1f} points), "
               f"RL phase {100 * before_rl:.1f}% -> {100 * final:.1f}% (+{100 * (final - before_rl):.1f} points)")
    print("\n".join(lines) + "\n" + summary)
    if args.no_record:
        return

    plot_curve(curve, ROOT / "docs" / "quickstart.png", "quickstart: SmolLM2-135M learns to search")
    shutil.copy(output_dir / "plot.png", ROOT / "docs" / "quickstart_metrics.png")
    date = datetime.date.today().isoformat()
    shown = " ".join([args.config, *args.overrides])
    section = "\n".join([
        BEGIN,
        "## Quickstart: held-out success, wall time and peak memory (`bench/quickstart.py`)",
        "",
        f"`agentrl train {shown}` on the CPU ({platform.machine()}, 2 torch threads): the embedded "
        "SmolLM2-135M-Instruct on fictional-world search QA (1-hop questions it cannot answer without "
        "the search tool), an SFT warm start on scripted demonstrations, then GRPO. Held-out success is "
        "greedy, one sample per held-out question.",
        "",
        "```",
        f".venv/bin/python bench/quickstart.py {' '.join(args.overrides)}".rstrip() + f"   # {date}, cpu-2",
        *lines,
        summary,
        "```",
        "",
        "![held-out success over the quickstart](docs/quickstart.png)",
        "",
        "Targets: within 20 minutes and under 6 GiB; held-out success +25 points over the untrained model, "
        "of which the RL phase at least +10.",
        "",
        "What this does and does not show: the held-out set is 48 one-hop questions about people who are "
        "disjoint from the training questions, and the task is easy once the format is known. The warm "
        "start is deliberately short (two updates on eight demonstrations): with 32 demonstrations for "
        "one epoch, SFT alone reaches 100% greedy success on the same questions and RL has nothing left "
        "to add. The RL phase's gain is real (the untrained and warm-started models are evaluated the "
        "same way, greedy, on the same held-out questions) but it is a gain over a weak warm start.",
        END,
    ])
    write_section(ROOT / "BENCHMARKS.md", BEGIN, END, section)


if __name__ == "__main__":
    main()
