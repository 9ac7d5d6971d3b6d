"""SPEAR against its baseline Dr.BoT, side by side, on the CPU.

Both arms run their config (configs/spear.yaml, configs/drbot.yaml: the same budget and settings;
SPEAR adds the tool-call curriculum and the self-imitation replay) for the same steps and seeds,
each in its own process, one after the other (``--arms`` runs some of them, so two processes can
run a seed's arms at once, under the same load), SmolLM2-135M-Instruct on fictional search questions.
Two tasks (``--task``):

- ``multi-hop`` (the default): two- and three-hop questions (who founded the company, where was
  that person born, ...) after one SFT warm start per seed on scripted chained lookups
  (``--demos``, ``--sft-epochs``; bench/estimators.py's task and calibration, which leaves the
  policy chaining some of the time, so the baseline has a signal to learn from). Both arms of a
  seed start from that seed's warm-start weights.
- ``one-hop``: one- and two-hop questions alternating after each config's own warm start on
  one-hop demonstrations (every one-hop question right, every two-hop one wrong: no signal).

Recorded: held-out success over the steps (mean and spread over seeds), the policy's entropy curve,
and the step time of SPEAR relative to Dr.BoT, pooled and per seed. ``--resume`` keeps every
finished run's result.

    .venv/bin/python bench/spear.py                                   # 3 seeds x 2 arms, recorded
    .venv/bin/python bench/spear.py --seeds 0 --steps 1 --eval-size 4 --demos 2 --no-record   # smoke

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
from bench import estimators  # noqa: E402
from bench.record import train_in_child, write_section  # noqa: E402

BEGIN, END = "<!-- spear:begin -->", "<!-- spear:end -->"
MULTI_HOPS = [2, 3]
TASKS = {
    "multi-hop": lambda args: (f"two- and three-hop fictional search questions after one warm start per seed, shared by "
                               f"both arms, on {args.demos} scripted chained lookups x {args.sft_epochs} epochs"),
    "one-hop": lambda args: ("one- and two-hop fictional search questions (alternating, so held-out is half two-hop) "
                             "after each config's warm start on one-hop demonstrations"),
}
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


def multi_hop_setup(args, data: Path) -> dict:
    """bench/estimators.py's task: its data, demonstrations and warm-start config."""
    from types import SimpleNamespace

    settings = SimpleNamespace(hops=MULTI_HOPS, group_size=4, steps=0, prompts=8, threads=args.threads,
                               demos=args.demos, sft_epochs=args.sft_epochs, eval_size=args.eval_size)
    config = estimators.base_config(settings, data)
    if not (data / "demos.jsonl").is_file():
        estimators.write_data(data, MULTI_HOPS, train_size=2000, eval_size=args.eval_size, demos=args.demos,
                              config=config)
    return config


def run_one(arm: str, seed: int, args, start: dict | None, output_dir: Path) -> dict:
    """One training run of ``configs/<arm>.yaml`` (from ``start``'s weights, if given); returns its
    eval curve, entropy curve and step times."""
    config = yaml.safe_load((ROOT / "configs" / f"{arm}.yaml").read_text())
    data = output_dir.parent / "data"
    config["env"].update({"eval_size": args.eval_size, "train_data": str(data / "train.jsonl"),
                          "eval_data": str(data / "eval.jsonl")})
    if start is not None:  # the multi-hop task: the seed's shared warm start, no SFT of the arm's own
        config["env"]["options"] = {"prompt": "short"}
        config["rollout"].update({"max_turns": max(MULTI_HOPS) + 1, "max_response_tokens": 96 * (max(MULTI_HOPS) + 1)})
        config["model"]["name"] = start["model"]
        config["sft"]["enabled"] = False
        config["trainer"]["eval_before"] = False
    config["trainer"].update({"steps": args.steps, "eval_every": args.eval_every, "seed": seed,
                              "torch_threads": args.threads, "save_every": 0})
    if arm == "spear":  # the schedules scale with the run length, as in the config
        config["spear"].update({"tool_call_steps": args.steps, "sil_ramp_steps": max(1, args.steps // 2)})
    config["tracking"] = {"backends": ["jsonl"], "progress": False, "plot": False, "sample_trajectories": 0}
    rows, wall_s = train_in_child(config, output_dir)
    steps = [r for r in rows if r["step"] > 0]
    evals = [(r["step"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r]
    return {
        "arm": arm, "seed": seed, "wall_s": wall_s,
        "eval": evals if start is None else [(0, start["before"]), *evals],
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
        per_seed = {r["seed"]: {} for r in results}
        for r in results:
            per_seed[r["seed"]][r["arm"]] = statistics.mean(r["step_s"])
        ratios = ", ".join(f"seed {seed}: {t['spear'] / t['drbot']:.2f}x" for seed, t in sorted(per_seed.items())
                           if len(t) == 2)
        lines.append(f"SPEAR / Dr.BoT step time: {step_time['spear'] / step_time['drbot']:.2f}x ({ratios})")
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
    parser.add_argument("--task", choices=("multi-hop", "one-hop"), default="multi-hop")
    parser.add_argument("--demos", type=int, default=12, help="multi-hop: scripted chained demonstrations")
    parser.add_argument("--sft-epochs", type=int, default=2, help="multi-hop: epochs of the warm start")
    parser.add_argument("--output-dir", default="runs/bench-spear")
    parser.add_argument("--no-record", action="store_true", help="do not edit BENCHMARKS.md")
    parser.add_argument("--resume", action="store_true", help="keep the results of runs that finished before")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="run only these arms (two processes can run a seed's arms at once, under the same load)")
    args = parser.parse_args()
    output, started, results = ROOT / args.output_dir, time.perf_counter(), []
    warm_config = None  # one-hop: each arm's own warm start
    if args.task == "multi-hop":
        warm_config = multi_hop_setup(args, output / "data")
    else:
        write_data(output / "data")
    for seed in args.seeds:
        start = None
        if warm_config is not None:
            start = estimators.finished(output / f"warm-start-seed{seed}", args.resume, estimators.warm_start,
                                        warm_config, seed)
        for arm in args.arms:  # the arms alternate, so a change of machine load hits both alike
            results.append(estimators.finished(output / f"{arm}-seed{seed}", args.resume, run_one, arm, seed, args,
                                               start))
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
        f"SmolLM2-135M-Instruct on the CPU ({platform.machine()}, {args.threads} torch threads): {TASKS[args.task](args)}; "
        f"{args.steps} RL steps of 8 prompts "
        f"x 4 samples per arm (configs/spear.yaml, configs/drbot.yaml), {len(args.seeds)} seeds; held-out success "
        f"greedy on {args.eval_size} questions (mean +- std over seeds). Curves: docs/spear_bench.png.",
        "",
        "```",
        f"{command}   # {datetime.date.today().isoformat()}, {sum(r['wall_s'] for r in results) / 60:.0f} min of RL runs",
        *lines,
        "```",
        "",
        "![SPEAR and Dr.BoT: held-out success and entropy](docs/spear_bench.png)",
        END,
    ])
    write_section(ROOT / "BENCHMARKS.md", BEGIN, END, section)


if __name__ == "__main__":
    main()
