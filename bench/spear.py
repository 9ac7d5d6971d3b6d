"""SPEAR against its baseline Dr.BoT, side by side, on the CPU.

Both arms run their config (configs/spear.yaml, configs/drbot.yaml: the same task, budget and
settings; SPEAR adds the tool-call curriculum and the self-imitation replay) for the same steps and
seeds, each in its own process, one after the other: SmolLM2-135M-Instruct on one- and two-hop
fictional search questions (alternating, so held-out success is half two-hop) after a warm start
that demonstrates one-hop lookups only. Recorded:
held-out success over the steps (mean and spread over seeds), the policy's entropy curve, and the
step time of SPEAR relative to Dr.BoT.

    .venv/bin/python bench/spear.py                                   # 3 seeds x 2 arms, recorded
    .venv/bin/python bench/spear.py --seeds 0 --steps 2 --eval-size 8 --no-record   # smoke

The section between the ``spear`` markers in BENCHMARKS.md is replaced on each recorded run, and
the curves go to docs/spear_bench.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.record import train_in_child, write_section  # noqa: E402

BEGIN, END = "<!-- spear:begin -->", "<!-- spear:end -->"
DATA = ROOT / "envs" / "data" / "fictional"
ARMS = ("drbot", "spear")


def write_data(directory: Path) -> None:
    """Train and eval splits with one- and two-hop questions alternating, so the held-out set is half
    two-hop (the bundled splits are about 80% one-hop, where the warm start already succeeds)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        one, two = ([r for r in rows if r.get("hops") == hops] for hops in (1, 2))
        mixed = [row for pair in zip(one, two) for row in pair]
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))


def run_one(arm: str, seed: int, args, output_dir: Path) -> dict:
    """One training run of ``configs/<arm>.yaml``; returns its eval curve, entropy curve and step times."""
    config = yaml.safe_load((ROOT / "configs" / f"{arm}.yaml").read_text())
    data = output_dir.parent / "data"
    config["env"].update({"eval_size": args.eval_size, "train_data": str(data / "train.jsonl"),
                          "eval_data": str(data / "eval.jsonl")})
    config["trainer"].update({"steps": args.steps, "eval_every": args.eval_every, "seed": seed,
                              "torch_threads": args.threads, "save_every": 0})
    if arm == "spear":  # the schedules scale with the run length, as in the config
        config["spear"].update({"tool_call_steps": args.steps, "sil_ramp_steps": max(1, args.steps // 2)})
    config["tracking"] = {"backends": ["jsonl"], "progress": False, "plot": False, "sample_trajectories": 0}
    rows, wall_s = train_in_child(config, output_dir)
    steps = [r for r in rows if r["step"] > 0]
    return {
        "arm": arm, "seed": seed, "wall_s": wall_s,
        "eval": [(r["step"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r],
        "entropy": [(r["step"], r["entropy"]) for r in steps if "entropy" in r],
        "step_s": [r["time/step_s"] for r in steps],
        "replays": sum(r.get("spear/replay_event", 0.0) for r in steps),
    }


def mean_curve(results: list[dict], key: str) -> list[tuple[int, float, float]]:
    """``(step, mean, std)`` over seeds at the steps every run logged."""
    by_step: dict[int, list[float]] = {}
    for result in results:
        for step, value in result[key]:
            by_step.setdefault(step, []).append(value)
    return [(step, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
            for step, v in sorted(by_step.items()) if len(v) == len(results)]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for arm in ARMS:
        rows = [r for r in results if r["arm"] == arm]
        for axis, key, label in ((left, "eval", "held-out success"), (right, "entropy", "policy entropy")):
            curve = mean_curve(rows, key)
            if not curve:
                continue
            steps, means, stds = zip(*curve)
            axis.plot(steps, means, marker="o", label=arm)
            axis.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
            axis.set_xlabel("RL step")
            axis.set_ylabel(label)
    left.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def summary(results: list[dict]) -> list[str]:
    lines = ["arm     held-out at start      held-out at the end    step time (mean)  replays/run"]
    step_time = {}
    for arm in ARMS:
        rows = [r for r in results if r["arm"] == arm]
        if not rows:
            continue
        start = [r["eval"][0][1] for r in rows]
        end = [r["eval"][-1][1] for r in rows]
        step_time[arm] = statistics.mean(s for r in rows for s in r["step_s"])

        def spread(values):
            deviation = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{100 * statistics.mean(values):5.1f}% +- {100 * deviation:4.1f}"

        lines.append(f"{arm:<7} {spread(start):<22} {spread(end):<22} {step_time[arm]:6.1f} s"
                     f"          {statistics.mean(r['replays'] for r in rows):.1f}")
    if len(step_time) == 2:
        lines.append(f"SPEAR / Dr.BoT step time: {step_time['spear'] / step_time['drbot']:.2f}x")
        ends = {arm: statistics.mean(r["eval"][-1][1] for r in results if r["arm"] == arm) for arm in ARMS}
        lines.append(f"SPEAR - Dr.BoT held-out success at the end: {100 * (ends['spear'] - ends['drbot']):+.1f} points")
    for arm in ARMS:
        curve = mean_curve([r for r in results if r["arm"] == arm], "eval")
        if curve:
            lines.append(f"{arm} curve: " + ", ".join(f"step {s}: {100 * m:.1f}%" for s, m, _ in curve))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-size", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="runs/bench-spear")
    parser.add_argument("--no-record", action="store_true", help="do not edit BENCHMARKS.md")
    args = parser.parse_args()
    output, started, results = ROOT / args.output_dir, time.perf_counter(), []
    write_data(output / "data")
    for seed in args.seeds:
        for arm in ARMS:  # the arms alternate, so a change of machine load hits both alike
            result = run_one(arm, seed, args, output / f"{arm}-seed{seed}")
            print(json.dumps({k: v for k, v in result.items() if k != "step_s"}), flush=True)
            results.append(result)
    total_s = time.perf_counter() - started
    lines = summary(results)
    print("\n".join(lines) + f"\ntotal wall time {total_s / 60:.1f} min")
    if args.no_record:
        return
    plot(results, ROOT / "docs" / "spear_bench.png")
    command = ("python bench/spear.py " + " ".join(sys.argv[1:])).rstrip()
    section = "\n".join([
        BEGIN,
        "## SPEAR against Dr.BoT (`bench/spear.py`)",
        "",
        f"SmolLM2-135M-Instruct on the CPU ({platform.machine()}, {args.threads} torch threads): one- and two-hop "
        f"fictional search questions (alternating, so held-out is half two-hop) after a warm start on one-hop demonstrations; {args.steps} RL steps of 8 prompts "
        f"x 4 samples per arm (configs/spear.yaml, configs/drbot.yaml), {len(args.seeds)} seeds; held-out success "
        f"greedy on {args.eval_size} questions (mean +- std over seeds). Curves: docs/spear_bench.png.",
        "",
        "```",
        f"{command}   # {datetime.date.today().isoformat()}, total {total_s / 60:.0f} min",
        *lines,
        "```",
        "",
        "![SPEAR and Dr.BoT: held-out success and entropy](docs/spear_bench.png)",
        END,
    ])
    write_section(ROOT / "BENCHMARKS.md", BEGIN, END, section)


if __name__ == "__main__":
    main()
