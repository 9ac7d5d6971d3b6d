"""Math with code: arithmetic and word problems whose numbers are too large to do in one's head,
solved with the python tool; rewarded by numeric match of the ``<answer>``.

Data: local JSONL with ``question`` and ``answer`` (a number), or, without a path, problems from a
deterministic generator (train and eval use different seeds).
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from agentrl.envs.base import Env, Reward, Task, load_rows

from agentrl.trajectory import Trajectory

PROMPT = (
    "Solve the problem. You can run Python by writing <python> code </python>; what it prints comes back "
    "between <output> and </output>. Give the final number as <answer> number </answer>.\nProblem: {question}"
)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def generate_problems(count: int, seed: int) -> list[dict[str, Any]]:
    """Deterministic problems: products, sums of products, remainders and short word problems."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        a, b, c = rng.randint(1_000, 99_999), rng.randint(100, 9_999), rng.randint(11, 997)
        kind = index % 4
        if kind == 0:
            question, answer = f"What is {a} * {b}?", a * b
        elif kind == 1:
            question, answer = f"What is {a} * {b} + {c} * {b}?", a * b + c * b
        elif kind == 2:
            question, answer = f"What is the remainder of {a * b} divided by {c}?", (a * b) % c
        else:
            question = (f"A warehouse has {b} shelves with {c} boxes on each shelf, and each box holds {a % 500 + 12} "
                        f"screws. How many screws are in the warehouse?")
            answer = b * c * (a % 500 + 12)
        rows.append({"id": f"math-{seed}-{index}", "question": question, "answer": answer})
    return rows


def parse_number(text: str) -> float | None:
    match = NUMBER.findall(text.replace(" ", ""))
    if not match:
        return None
    try:
        return float(match[-1].replace(",", ""))
    except ValueError:
        return None


class MathCodeEnv(Env):
    """Options: ``train_size`` and ``eval_size`` of the generated data; ``tolerance`` (relative)."""

    name = "math_code"
    option_names = ("train_size", "eval_size", "tolerance")
    tools = ("python",)
    action_format = "xml"
    tags = {"python": "python"}
    answer_tag = "answer"
    observation_template = "\n<output>\n{observation}\n</output>\n"
    final_turn_message = "\n<output>\nNo more code runs are allowed. Give your answer now.\n</output>\n"

    def load(self, split: Literal["train", "eval"], path: str | None = None) -> list[dict[str, Any]]:
        if path is not None:
            return load_rows(path)
        size = int(self.options.get(f"{split}_size", 2000 if split == "train" else 200))
        return generate_problems(size, seed=0 if split == "train" else 1)

    def make_task(self, row: dict[str, Any], index: int) -> Task:
        return Task(id=str(row.get("id", index)), messages=[{"role": "user", "content": PROMPT.format(question=row["question"])}],
                    answer=float(str(row["answer"]).replace(",", "")))

    def reward(self, task: Task, trajectory: Trajectory) -> Reward:
        """1 when the answer's last number equals the gold: exactly for integer golds, within a
        relative tolerance (option ``tolerance``, 1e-6) otherwise."""
        value = parse_number(trajectory.answer) if trajectory.answer is not None else None
        if value is None:
            return Reward(0.0, False, info={"answered": float(trajectory.answer is not None)})
        if float(task.answer).is_integer():
            correct = value == task.answer
        else:
            tolerance = float(self.options.get("tolerance", 1e-6))
            correct = abs(value - task.answer) <= tolerance * abs(task.answer)
        return Reward(float(correct), correct, info={"answered": 1.0})
