"""Search self-play against its supervised reference: held-out solver success over RL steps from one
warm start, for ``configs/ssp.yaml`` (self-play, which reads no question) and for GRPO trained on the
fictional world's generated training question-answer pairs with the same compute per step.

Both arms start from one SFT warm start on the scripted demonstrations of both roles (run once; its
step-0 checkpoint is copied into each arm's output directory). The self-play arm trains
``prompts_per_step`` proposals and ``n_solve`` solver attempts at each; the supervised arm trains
GRPO (``recipe=default``) on ``prompts_per_step`` training questions of the same hop count with
groups of ``n_solve + 1``, so both train the same number of trajectories per step. They alternate
in chunks of ``--chunk`` RL steps (each resuming its own checkpoint), so that both see the same
background load on a shared machine, and stop after ``--steps``, or earlier when ``--deadline``
(UTC ``HH:MM``) leaves no time for another pair of chunks. Held-out success (the env's eval split,
greedy) is measured at the end of every chunk; the result goes into BENCHMARKS.md with a plot.

    .venv/bin/python bench/self_play.py [--steps 8] [--chunk 4] [--deadline 02:30] [--no-record] [overrides ...]

``--proposals N --warm-start DIR`` only samples the proposer on the first ``N`` answers of the
stream from that warm start's checkpoint and prints each proposal's stop reason, question and
verdict (the rules, then the RAG check), to see whether self-play will have valid questions to
start from before paying for the benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentrl.tracking import read_metrics  # noqa: E402
from bench.partial_train import seconds_until, train  # noqa: E402  (one `agentrl train` child process)
from bench.record import write_section  # noqa: E402

CONFIG = "configs/ssp.yaml"
BEGIN, END = "<!-- bench/self_play.py begin -->", "<!-- bench/self_play.py end -->"
PLOT = ROOT / "docs" / "self_play_bench.png"


def arms(config: dict) -> dict[str, list[str]]:
    n_solve = config["self_play"]["n_solve"]
    supervised = ["recipe=default", f"env.train_data={ROOT / 'envs/data/fictional/train.jsonl'}",
                  f"rollout.group_size={n_solve + 1}"]
    return {"self-play": [], "supervised GRPO": supervised}


WARM_SECTIONS = ("model", "sft", "env", "tools", "rollout", "self_play")


def reuse_warm_start(source: Path, target: Path, overrides: list[str]) -> float:
    """Copy a finished warm start (step-0 checkpoint and metrics) to ``target`` after checking that
    it was made with the settings this run would use; returns the time it took when it was made."""
    from agentrl.config import load_config

    wanted = load_config(ROOT / CONFIG, overrides)
    # read through the config's model, so that settings added since then compare as their defaults
    made = type(wanted).model_validate(yaml.safe_load((source / "config.yaml").read_text())).model_dump(mode="json")
    wanted = wanted.model_dump(mode="json")
    rl_only = ("train_roles", "dynamic_sampling_max_draws")  # like the pool's, they act only in RL steps
    for settings in (made, wanted):
        settings["self_play"] = {k: v for k, v in settings.get("self_play", {}).items()
                                 if not k.startswith("pool_") and k not in rl_only}
    differ = [key for key in WARM_SECTIONS if made.get(key) != wanted.get(key)]
    if differ:
        raise SystemExit(f"{source} was warm-started with other {', '.join(differ)} settings than this run's")
    if not (source / "checkpoints").is_dir():
        raise SystemExit(f"{source} holds no checkpoint")
    shutil.copytree(source / "checkpoints", target / "checkpoints")
    shutil.copy(source / "metrics.jsonl", target / "metrics.jsonl")
    shutil.copy(source / "config.yaml", target / "config.yaml")
    timing = source / "warm_start_s"
    return float(timing.read_text()) if timing.exists() else float("nan")


def probe_proposals(warm: Path, count: int, overrides: list[str]) -> None:
    """The first ``count`` proposals of a self-play run from ``warm``'s checkpoint, checked as step 1 checks them."""
    from collections import Counter

    from agentrl.config import load_config
    from agentrl.recipes.base import step_seed
    from agentrl.trainer.checkpoint import latest_checkpoint, load_weights
    from agentrl.trainer.local import build_run, close_run

    checkpoint = latest_checkpoint(warm)
    if checkpoint is None:
        raise SystemExit(f"{warm} holds no checkpoint")
    config = load_config(ROOT / CONFIG, [*overrides, f"output_dir={warm / 'proposals'}"])
    run = build_run(config)
    try:
        load_weights(run.model, checkpoint / "model")
        run.engine.update_weights()
        recipe = run.recipe
        rows = recipe.next_answers(count)
        trajectories, outputs, verdicts = recipe.propose(rows, 1, step_seed(config, 1))  # step 1's first round
    finally:
        close_run(run)
    for (_, row), trajectory, output, verdict in zip(rows, trajectories, outputs, verdicts, strict=True):
        print(f"{row['answer']!r} (n={row['hops']}): stop {trajectory.stop_reason}, searches {output.queries}, "
              f"question {verdict.question!r}: {'valid' if verdict.valid else verdict.reason}"
              + (f" (RAG check answered {verdict.rag_answer!r})" if verdict.rag_ran else ""))
    reasons = Counter(v.reason or "valid" for v in verdicts)
    stops = Counter(t.stop_reason for t in trajectories)
    print(f"{reasons['valid']} of {count} valid at proposer temperature {recipe.proposer_worker.config.temperature:g}; "
          f"verdicts {dict(reasons.most_common())}; stop reasons {dict(stops.most_common())}")


def summarise(rows: list[dict]) -> dict:
    steps = [r for r in rows if r["step"] > 0 and "time/step_s" in r]

    def mean(key: str) -> float:
        values = [r[key] for r in steps if key in r]
        return statistics.fmean(values) if values else float("nan")

    trained = [sum(r.get(f"{prefix}update/trajectories", 0.0) for prefix in ("", "proposer/", "solver/")) for r in steps]
    return {"steps": len(steps), "step_s": mean("time/step_s"),
            "trajectories": statistics.fmean(trained) if trained else float("nan"),
            "train_success": mean("success_rate"),
            "curve": [(r["step"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r],
            **{key: mean(f"self_play/{key}") for key in ("valid_rate", "rag_pass_rate", "solver_accuracy",
                                                         "proposer_reward", "pool_size", "reused_slots")}}


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6))
    for arm, result in results.items():
        steps, success = zip(*result["curve"]) if result["curve"] else ((), ())
        axis.plot(steps, [100 * s for s in success], marker="o", label=arm)
    axis.set_xlabel("RL step (0: after the warm start)")
    axis.set_ylabel("held-out success, %")
    axis.set_title("configs/ssp.yaml: self-play vs GRPO on QA pairs")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/bench-self-play")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=4, help="RL steps per arm before the other arm's turn")
    parser.add_argument("--deadline", default=None, help="UTC HH:MM by which the last chunk must end")
    parser.add_argument("--no-record", dest="record", action="store_false", help="print only; leave BENCHMARKS.md")
    parser.add_argument("--warm-start", default=None, help="reuse this directory's warm start (the `warm` directory of an "
                        "earlier run of this bench, or an `agentrl train` run with trainer.steps=0) instead of running "
                        "one; its SFT, model, env, tools and rollout settings must equal this run's")
    parser.add_argument("--proposals", type=int, default=0, help="only check this many proposals from --warm-start")
    parser.add_argument("overrides", nargs="*", help="config overrides for both arms (key=value)")
    args = parser.parse_args()
    if args.steps < 1 or args.chunk < 1:
        parser.error("--steps and --chunk must be at least 1")
    if args.proposals:
        if not args.warm_start:
            parser.error("--proposals needs --warm-start")
        probe_proposals(ROOT / args.warm_start, args.proposals, args.overrides)
        return

    config = yaml.safe_load((ROOT / CONFIG).read_text())
    for override in args.overrides:  # the values the arms' sizes and the report depend on
        key, _, value = override.partition("=")
        if key == "self_play.n_solve":
            config["self_play"]["n_solve"] = int(value)
        if key == "env.eval_size":
            config["env"]["eval_size"] = int(value)
    root = ROOT / args.output_dir
    log = root / "train.log"
    if args.warm_start and root.resolve() in (ROOT / args.warm_start).resolve().parents:
        parser.error("--warm-start must lie outside --output-dir, which is emptied first")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    common = [*args.overrides, "tracking.progress=false", f"trainer.eval_every={args.chunk}",
              f"trainer.save_every={args.chunk}", "trainer.keep_checkpoints=1"]
    if args.warm_start:
        warm_s = reuse_warm_start(Path(args.warm_start), root / "warm", [*common, "trainer.steps=0"])
        print(f"warm start reused from {args.warm_start} (it took {warm_s:.0f} s)", flush=True)
    else:
        print(f"warm start (SFT on both roles' demonstrations, the step-0 evaluation); log: {log}", flush=True)
        warm_s = train(CONFIG, root / "warm", [*common, "trainer.steps=0"], log)
        (root / "warm" / "warm_start_s").write_text(f"{warm_s:.1f}\n")
        print(f"  {warm_s:.0f} s", flush=True)
    plan = arms(config)
    for arm in plan:
        shutil.copytree(root / "warm" / "checkpoints", root / arm.replace(" ", "-") / "checkpoints")
        shutil.copy(root / "warm" / "metrics.jsonl", root / arm.replace(" ", "-") / "metrics.jsonl")
    done, wall = 0, {arm: 0.0 for arm in plan}
    while done < args.steps:
        chunk = min(args.chunk, args.steps - done)
        pair_started = time.perf_counter()
        for arm, keys in plan.items():
            seconds = train(CONFIG, root / arm.replace(" ", "-"), [*common, *keys, "resume=true", f"trainer.steps={done + chunk}"], log)
            wall[arm] += seconds
            print(f"  {arm}: steps {done + 1}-{done + chunk} in {seconds:.0f} s", flush=True)
        done += chunk
        pair_s = time.perf_counter() - pair_started
        if done < args.steps and seconds_until(args.deadline) < 1.1 * pair_s:
            print(f"stopping after {done} steps: the next pair of chunks would end after {args.deadline} UTC", flush=True)
            break

    results = {arm: summarise(read_metrics(root / arm.replace(" ", "-") / "metrics.jsonl")) for arm in plan}
    warm_rows = read_metrics(root / "warm" / "metrics.jsonl")
    base = next((r.get("eval_base/success_rate") for r in warm_rows if "eval_base/success_rate" in r), float("nan"))
    reused = f" (made beforehand by the same settings, {args.warm_start})" if args.warm_start else ""
    lines = [f"{done} RL steps per arm ({CONFIG} {' '.join(args.overrides)}); warm start {warm_s / 60:.1f} min{reused}, shared; "
             f"held-out success before the warm start {100 * base:.1f}%"]
    lines.append(f"{'arm':<17}{'steps':>6}{'traj/step':>10}{'step s':>8}{'wall min':>9}  held-out success by step")
    for arm, result in results.items():
        curve = ", ".join(f"{step}: {100 * success:.1f}%" for step, success in result["curve"])
        lines.append(f"{arm:<17}{result['steps']:>6}{result['trajectories']:>10.0f}{result['step_s']:>8.0f}"
                     f"{wall[arm] / 60:>9.1f}  {curve}")
        if arm == "self-play":
            lines.append(f"{'':<17}valid questions {100 * result['valid_rate']:.0f}%, RAG pass {100 * result['rag_pass_rate']:.0f}%, "
                         f"solver accuracy on them {100 * result['solver_accuracy']:.0f}%, proposer reward "
                         f"{result['proposer_reward']:.2f}, pool {result['pool_size']:.1f}, reused slots/step "
                         f"{result['reused_slots']:.1f} (means over steps)")
    print("\n".join(lines))
    if not args.record:
        return
    plot(results, PLOT)
    gain = {arm: (r["curve"][-1][1] - r["curve"][0][1]) * 100 if len(r["curve"]) > 1 else float("nan")
            for arm, r in results.items()}
    section = "\n".join([
        BEGIN, "## Search self-play vs GRPO on question-answer pairs (`bench/self_play.py`)", "",
        f"Held-out success (the {config['env']['eval_size']} first two-hop fictional eval questions, greedy) over RL "
        f"steps from one SFT warm start on scripted demonstrations (both roles and the RAG check). Self-play reads only the answers file; the "
        f"supervised reference trains GRPO on the training questions of the same hop count with the same number of "
        f"rollouts per step (traj/step: the trajectories trained; self-play's attempts at placeholder problems are "
        f"not). Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on the "
        "shared 2-core CPU machine, `trainer.torch_threads` as configured.", "",
        "```", *lines, "```", "",
        f"Change from the warm start: self-play {gain['self-play']:+.1f} points, supervised GRPO "
        f"{gain['supervised GRPO']:+.1f} points (target for self-play: at least +10).", "",
        f"![held-out success over steps]({PLOT.relative_to(ROOT)})", END])
    write_section(ROOT / "BENCHMARKS.md", BEGIN, END, section)
    print(f"recorded in BENCHMARKS.md and {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
