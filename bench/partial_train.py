"""Partial rollouts inside ``agentrl train``: steps per hour and held-out success with
``rollout.partial.enabled`` off and on, side by side in one run, on the quickstart task.

Both arms start from one SFT warm start (run once; its step-0 checkpoint is copied into each arm's
output directory) and differ only in the partial-rollout keys. They alternate in chunks of
``--chunk`` RL steps, each chunk resuming the arm's own checkpoint (carried trajectories included),
so that both see the same background load on a shared machine; both stop after the same number of
steps: ``--steps``, or fewer when ``--deadline`` (UTC ``HH:MM``) leaves no time for another pair of
chunks. Held-out success is evaluated (greedy, as in the quickstart) at the end of every chunk.

    .venv/bin/python bench/partial_train.py [--config configs/quickstart.yaml] [--steps 12] [--chunk 3]
                                            [--deadline 21:58] [overrides ...]

What partial rollouts can gain here is bounded by how much of a step the rollout is: the script
prints the rollout's share of the off arm's step time and the speed-up a free rollout would give.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentrl.tracking import read_metrics  # noqa: E402

ARMS = {"partial off": ["rollout.partial.enabled=false"], "partial on": ["rollout.partial.enabled=true"]}


def train(config: str, output_dir: Path, overrides: list[str], log: Path) -> float:
    """One ``agentrl train`` child process; returns its wall time."""
    command = [sys.executable, "-m", "agentrl.cli", "train", config, f"output_dir={output_dir}", *overrides]
    started = time.perf_counter()
    with log.open("a") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        subprocess.run(command, cwd=ROOT, check=True, stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def seconds_until(deadline: str | None) -> float:
    if deadline is None:
        return float("inf")
    now = datetime.datetime.now(datetime.timezone.utc)
    hour, minute = map(int, deadline.split(":"))
    target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return (target - now).total_seconds()


def summarise(rows: list[dict]) -> dict:
    steps = [r for r in rows if r["step"] > 0 and "time/step_s" in r]
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in steps) if steps else float("nan")  # noqa: E731
    curve = [(r["step"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r]
    return {
        "steps": len(steps), "step_s": mean("time/step_s"), "rollout_s": mean("time/rollout_s"),
        "update_s": mean("time/update_s"), "trained": mean("update/trajectories"), "carried": mean("partial/groups_carried"),
        "stale": mean("rollout/stale_fraction"), "reward": mean("reward_mean"), "curve": curve,
        "is_weight": statistics.fmean(r["rollout/stale_is_weight_mean"] for r in steps if "rollout/stale_is_weight_mean" in r)
        if any("rollout/stale_is_weight_mean" in r for r in steps) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--output-dir", default="runs/bench-partial-train")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--chunk", type=int, default=3, help="RL steps per arm before the other arm's turn")
    parser.add_argument("--deadline", default=None, help="UTC HH:MM by which the last chunk must end")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="continue a run of this script in --output-dir (both arms from their last chunk)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both arms (key=value)")
    args = parser.parse_args()
    if args.steps < 1 or args.chunk < 1:
        parser.error("--steps and --chunk must be at least 1")

    root = ROOT / args.output_dir
    log = root / "train.log"
    common = [*args.overrides, "tracking.progress=false", f"trainer.eval_every={args.chunk}",
              f"trainer.save_every={args.chunk}", "trainer.keep_checkpoints=1"]
    if args.resume:
        warm_s = float((root / "warm_s").read_text())
        wall = {arm: float((root / arm.replace(" ", "-") / "wall_s").read_text()) for arm in ARMS}
        done = min(max(r["step"] for r in read_metrics(root / arm.replace(" ", "-") / "metrics.jsonl")) for arm in ARMS)
        print(f"continuing after {done} steps per arm", flush=True)
    else:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        print(f"warm start (SFT and the step-0 evaluation), shared by both arms; log: {log}", flush=True)
        warm_s = train(args.config, root / "warm", [*common, "trainer.steps=0"], log)
        (root / "warm_s").write_text(str(warm_s))
        print(f"  {warm_s:.0f} s", flush=True)
        for arm in ARMS:
            arm_dir = root / arm.replace(" ", "-")
            shutil.copytree(root / "warm" / "checkpoints", arm_dir / "checkpoints")
        done, wall = 0, {arm: 0.0 for arm in ARMS}
    while done < args.steps:
        chunk = min(args.chunk, args.steps - done)
        pair_started = time.perf_counter()
        for arm, keys in ARMS.items():
            seconds = train(args.config, root / arm.replace(" ", "-"),
                            [*common, *keys, "resume=true", f"trainer.steps={done + chunk}"], log)
            wall[arm] += seconds
            (root / arm.replace(" ", "-") / "wall_s").write_text(str(wall[arm]))
            print(f"  {arm}: steps {done + 1}-{done + chunk} in {seconds:.0f} s", flush=True)
        done += chunk
        pair_s = time.perf_counter() - pair_started
        if done < args.steps and seconds_until(args.deadline) < 1.1 * pair_s * min(args.chunk, args.steps - done) / chunk:
            print(f"stopping after {done} steps: the next pair of chunks would end after {args.deadline} UTC", flush=True)
            break

    results = {arm: summarise(read_metrics(root / arm.replace(" ", "-") / "metrics.jsonl")) for arm in ARMS}
    off, on = results["partial off"], results["partial on"]
    print()
    print(f"{done} RL steps per arm ({args.config} {' '.join(args.overrides)}); warm start {warm_s / 60:.1f} min, shared")
    print(f"{'':<14}{'step s':>8}{'rollout s':>10}{'update s':>9}{'steps/h':>9}{'trained/step':>13}"
          f"{'carried':>8}{'stale tok':>10}{'IS w':>7}{'reward':>8}{'wall min':>9}")
    for arm, r in results.items():
        weight = f"{r['is_weight']:.3f}" if r["is_weight"] is not None else "-"
        print(f"{arm:<14}{r['step_s']:>8.1f}{r['rollout_s']:>10.1f}{r['update_s']:>9.1f}{3600 / r['step_s']:>9.1f}"
              f"{r['trained']:>13.1f}{r['carried']:>8.2f}{r['stale']:>10.3f}{weight:>7}{r['reward']:>8.3f}{wall[arm] / 60:>9.1f}")
    print("held-out success (greedy), by RL step:")
    steps = sorted({s for r in results.values() for s, _ in r["curve"]})
    print(f"{'step':<14}" + "".join(f"{s:>7}" for s in steps))
    for arm, r in results.items():
        values = dict(r["curve"])
        print(f"{arm:<14}" + "".join(f"{100 * values[s]:>6.1f}%" if s in values else f"{'-':>7}" for s in steps))
    print(f"steps per hour, on / off: {off['step_s'] / on['step_s']:.2f}x; "
          f"trained trajectories per hour, on / off: {(on['trained'] / on['step_s']) / (off['trained'] / off['step_s']):.2f}x")
    share = off["rollout_s"] / off["step_s"]
    print(f"bound: the rollout is {100 * share:.0f}% of an off step ({off['rollout_s']:.1f} of {off['step_s']:.1f} s); "
          f"a step could be at most {1 / (1 - share):.2f}x faster if rollouts cost nothing")


if __name__ == "__main__":
    main()
