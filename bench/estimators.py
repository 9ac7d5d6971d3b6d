"""Advantage estimators side by side on a multi-hop fictional search task.

SmolLM2-135M-Instruct on the CPU must chain searches: a 2-hop question ("In which city was the
founder of Plelzei House born?") needs the company, then its founder; a 3-hop one ("In which
country ...") also the founder's city. Every method starts from the same SFT warm start on scripted
multi-hop demonstrations (each search from the real search tool), run once per seed and shared by
that seed's methods, and trains the same number of steps with the same seeds; held-out success is
greedy, one sample per held-out question.

    .venv/bin/python bench/estimators.py                          # 6 methods x 3 seeds, recorded
    .venv/bin/python bench/estimators.py --calibrate               # warm start + eval only
    .venv/bin/python bench/estimators.py --resume                  # continue a stopped run
    .venv/bin/python bench/estimators.py --methods grpo gigpo --seeds 0 --steps 1 --eval-size 4 --no-record

``--calibrate`` runs only the warm start (0 RL steps) for the first seed and prints held-out
success, to choose ``--demos``/``--sft-epochs`` so that the baseline starts above 0% and below 60%:
a task where no method moves compares nothing. The section between the ``estimators`` markers in
BENCHMARKS.md is replaced on each recorded run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.record import train_in_child, write_section  # noqa: E402

BEGIN, END = "<!-- estimators:begin -->", "<!-- estimators:end -->"
DATA = ROOT / "envs" / "data" / "fictional"
METHODS = ("grpo", "dr_grpo", "rloo", "turn_grpo", "gigpo", "archer")
# per-method settings that differ from the shared config (each as its paper or this project ships it)
METHOD_OVERRIDES = {
    "grpo": {},
    "dr_grpo": {"loss_agg": "dr-grpo"},
    "rloo": {},
    "turn_grpo": {"turn_gamma": 0.9},
    "gigpo": {"gigpo": {"step_weight": 1.0, "gamma": 0.95}},
    "archer": {"archer": {"warmup_steps": 2, "updates_per_step": 16, "gamma": 0.95}},
}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def city_of(person: str, corpus: dict[str, str]) -> str | None:
    match = re.search(r"in the city of (\w+)", corpus.get(person, ""))
    return match.group(1) if match else None


def multi_hop_actions(corpus: dict[str, str]):
    """A scripted policy for the multi-hop questions: search the company, then its founder (the
    row's ``entity``), then for 3 hops the founder's city, then answer."""

    def actions(row: dict) -> list[str | None]:
        match = re.search(r"the founder of (.+?) born\?", row["question"])
        if match is None:
            return [f"<search> {row['entity']} </search>", None]
        steps = [f"<search> {match.group(1)} </search>", f"<search> {row['entity']} </search>"]
        if row.get("hops") == 3 and (city := city_of(row["entity"], corpus)):
            steps.append(f"<search> {city} </search>")
        return [*steps, None]

    return actions


def write_data(directory: Path, hops: list[int], train_size: int, eval_size: int, demos: int, config: dict) -> None:
    """Train/eval JSONL restricted to ``hops`` (an even mix), and demonstrations from the real tool."""
    from agentrl.config import build_config
    from agentrl.executor import ToolExecutor
    from agentrl.models import load_tokenizer
    from agentrl.trainer import sft
    from envs import get_env_class

    directory.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", train_size), ("eval", eval_size)):
        rows = read_rows(DATA / f"{split}.jsonl")
        per_hop = [[r for r in rows if r.get("hops") == h] for h in hops]
        mixed = [row for group in zip(*per_hop) for row in group][:size]
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    corpus = {}
    for doc in read_rows(DATA / "corpus.jsonl"):
        title, _, _ = doc["contents"].partition("\n")
        corpus[title] = doc["contents"]
    resolved = build_config(config)
    env = get_env_class("search_qa")(**resolved.env.options)
    executor = ToolExecutor(resolved.tools.names, resolved.tools.options)
    tokenizer = load_tokenizer(resolved.model.name)
    # demonstrations from training rows the RL stream also sees; the held-out questions stay unseen
    train_rows = read_rows(directory / "train.jsonl")[:demos]
    policies = dict(sft.DEMONSTRATION_POLICIES)
    sft.DEMONSTRATION_POLICIES["search_qa"] = multi_hop_actions(corpus)
    try:
        sft.generate_demonstrations(env, executor, tokenizer, train_rows, resolved.tools, directory / "demos.jsonl")
    finally:
        sft.DEMONSTRATION_POLICIES.clear()
        sft.DEMONSTRATION_POLICIES.update(policies)
        import asyncio

        asyncio.run(executor.close())


def base_config(args, data: Path) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["env"] = {"name": "search_qa", "train_data": str(data / "train.jsonl"), "eval_data": str(data / "eval.jsonl"),
                     "eval_size": args.eval_size, "options": {"prompt": "short"}}
    config["rollout"].update({"max_turns": max(args.hops) + 1, "max_new_tokens": 32,
                              "max_response_tokens": 96 * (max(args.hops) + 1), "group_size": args.group_size})
    config["trainer"].update({"steps": args.steps, "eval_every": args.steps or 1, "prompts_per_step": args.prompts,
                              "minibatch_size": args.prompts * args.group_size, "torch_threads": args.threads,
                              "save_every": 0})
    config["sft"].update({"data": str(data / "demos.jsonl"), "num_demonstrations": args.demos, "epochs": args.sft_epochs})
    config["tracking"] = {"backends": ["jsonl"], "progress": False, "plot": False, "sample_trajectories": 0}
    return config


def warm_start(config: dict, seed: int, output_dir: Path) -> dict:
    """The SFT warm start of one seed, once, in a child process: every method of that seed starts
    from the weights it saves. Returns held-out success before and after SFT and the model's path."""
    config = json.loads(json.dumps(config))
    config["trainer"].update({"steps": 0, "seed": seed})
    rows, wall_s = train_in_child(config, output_dir)
    first = rows[0]
    return {"seed": seed, "base": first["eval_base/success_rate"], "before": first["eval/success_rate"],
            "model": str(output_dir / "model"), "wall_s": wall_s}


def run_one(config: dict, method: str, start: dict, output_dir: Path) -> dict:
    """RL from the seed's warm start in a child process; returns held-out success at the end."""
    config = json.loads(json.dumps(config))
    config["model"] = {**config.get("model", {}), "name": start["model"]}
    config["sft"]["enabled"] = False
    config["algo"] = {**config.get("algo", {}), "advantage": method, **METHOD_OVERRIDES[method]}
    config["trainer"].update({"seed": start["seed"], "eval_before": False})
    rows, wall_s = train_in_child(config, output_dir)
    after = [row["eval/success_rate"] for row in rows if "eval/success_rate" in row][-1]
    return {"method": method, "seed": start["seed"], "before": start["before"], "after": after, "wall_s": wall_s}


def finished(output_dir: Path, resume: bool, run, *args) -> dict:
    """``run(*args, output_dir)``'s result, kept in ``output_dir/result.json``; with ``resume``, a run whose
    result is already there is not repeated (a stopped benchmark continues where it was)."""
    path = output_dir / "result.json"
    if resume and path.is_file():
        result = json.loads(path.read_text())
    else:
        result = run(*args, output_dir)
        path.write_text(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:5.1f}% +- {100 * deviation:4.1f} [{100 * min(values):.0f}-{100 * max(values):.0f}]"


def table(results: list[dict], methods: list[str], starts: list[dict]) -> list[str]:
    lines = [f"warm start  before SFT {spread([s['base'] for s in starts])}, after SFT {spread([s['before'] for s in starts])}, "
             f"{statistics.mean(s['wall_s'] for s in starts) / 60:.1f} min per seed (SFT and both evaluations)",
             "method      held-out before RL      held-out after RL       RL wall time per run"]
    for method in methods:
        rows = [r for r in results if r["method"] == method]
        if rows:
            lines.append(f"{method:<11} {spread([r['before'] for r in rows]):<23} {spread([r['after'] for r in rows]):<23} "
                         f"{statistics.mean(r['wall_s'] for r in rows) / 60:.1f} min")
    return lines


def record(lines: list[str], command: str, args, total_s: float) -> None:
    date = datetime.date.today().isoformat()
    section = "\n".join([
        BEGIN,
        "## Advantage estimators on multi-hop search (`bench/estimators.py`)",
        "",
        f"SmolLM2-135M-Instruct on the CPU ({platform.machine()}, {args.threads} torch threads), fictional-world "
        f"questions with {'/'.join(map(str, args.hops))} hops (each hop one search), {args.steps} RL steps of "
        f"{args.prompts} prompts x {args.group_size} samples after an SFT warm start on {args.demos} scripted multi-hop "
        f"demonstrations; {len(args.seeds)} seeds per method; held-out success greedy on {args.eval_size} questions "
        "(mean +- std [min-max] over seeds).",
        "",
        "```",
        f"{command}   # {date}, total {total_s / 60:.0f} min",
        *lines,
        "```",
        END,
    ])
    write_section(ROOT / "BENCHMARKS.md", BEGIN, END, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--hops", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--demos", type=int, default=24, help="scripted multi-hop demonstrations for the warm start")
    parser.add_argument("--sft-epochs", type=int, default=3)
    parser.add_argument("--eval-size", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="runs/bench-estimators")
    parser.add_argument("--calibrate", action="store_true", help="only the warm start and its held-out success")
    parser.add_argument("--no-record", action="store_true", help="do not edit BENCHMARKS.md")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs that finished before (their result.json), run the rest")
    args = parser.parse_args()

    output = ROOT / args.output_dir
    data = output / "data"
    config = base_config(args, data)
    write_data(data, args.hops, train_size=2000, eval_size=args.eval_size, demos=args.demos, config=config)
    if args.calibrate:
        start = warm_start(config, args.seeds[0], output / "calibrate")
        print(f"held-out success: {100 * start['base']:.1f}% before SFT, {100 * start['before']:.1f}% after "
              f"({start['wall_s'] / 60:.1f} min)")
        return
    started, results, starts = time.perf_counter(), [], []
    for seed in args.seeds:
        start = finished(output / f"warm-start-seed{seed}", args.resume, warm_start, config, seed)
        starts.append(start)
        for method in args.methods:
            results.append(finished(output / f"{method}-seed{seed}", args.resume, run_one, config, method, start))
    total_s = time.perf_counter() - started
    lines = table(results, args.methods, starts)
    print("\n".join(lines) + f"\ntotal wall time {total_s / 60:.1f} min")
    if not args.no_record:
        command = "python bench/estimators.py " + " ".join(sys.argv[1:])
        record(lines, command.rstrip(), args, total_s)


if __name__ == "__main__":
    main()
