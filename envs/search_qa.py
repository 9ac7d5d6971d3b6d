"""Search question answering in the Search-R1 format: the model searches with ``<search>``, reads
``<information>`` and answers with ``<answer>``; rewarded by exact match after SQuAD normalisation.

Data: the Search-R1/FlashRAG QA format (``question``, ``golden_answers``) from local JSONL or
parquet: NQ, TriviaQA, PopQA, HotpotQA, 2WikiMultihopQA, MuSiQue and Bamboogle as FlashRAG ships
them (``<root>/<dataset>/<split>.jsonl``), or any file. Without a path, the bundled fictional
corpus's questions, which no pretrained model can answer without searching.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from agentrl.envs.base import Env, Reward, Task, load_rows

from agentrl.trajectory import Trajectory

DATA_DIR = Path(__file__).parent / "data" / "fictional"

# FlashRAG dataset directory names; the split files are train/dev/test.{jsonl,parquet}.
DATASETS = {
    "nq": "nq", "triviaqa": "triviaqa", "popqa": "popqa", "hotpotqa": "hotpotqa",
    "2wiki": "2wikimultihopqa", "musique": "musique", "bamboogle": "bamboogle",
}

# The Search-R1 instruction (Jin et al., 2025), verbatim.
SEARCH_R1_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
    "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: {question}\n"
)

# A shorter instruction for small models (the quickstart): same tags, fewer tokens.
SHORT_PROMPT = (
    "Answer the question. Search with <search> query </search>; results come back in <information> "
    "</information>. Then give the answer as <answer> answer </answer>.\nQuestion: {question}"
)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golden_answers: list[str]) -> float:
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(g) for g in golden_answers))


def f1_score(prediction: str, golden_answers: list[str]) -> float:
    """Token-level F1 against the best-matching golden answer (SQuAD)."""
    best = 0.0
    predicted_tokens = normalize_answer(prediction).split()
    for gold in golden_answers:
        gold_tokens = normalize_answer(gold).split()
        common = Counter(predicted_tokens) & Counter(gold_tokens)
        overlap = sum(common.values())
        if overlap == 0:
            continue
        precision, recall = overlap / len(predicted_tokens), overlap / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def golden_answers(row: dict[str, Any]) -> list[str]:
    for key in ("golden_answers", "answers", "answer", "possible_answers"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            return [value]
        return [str(v) for v in value]
    raise ValueError(f"row {row.get('id', '?')} has no golden_answers/answers/answer field")


class SearchQAEnv(Env):
    """Options: ``dataset`` (a FlashRAG name, with the path as its root directory), ``prompt``
    (``search_r1`` or ``short``), ``hops`` (keep only questions with this many hops, or any of a
    list of counts, demo data)."""

    name = "search_qa"
    option_names = ("dataset", "hops", "prompt")
    tools = ("search",)
    action_format = "xml"
    tags = {"search": "search"}
    answer_tag = "answer"
    observation_template = "\n\n<information>{observation}</information>\n\n"
    final_turn_message = "\n\n<information>No more searches are allowed. Give your answer now.</information>\n\n"

    def load(self, split: Literal["train", "eval"], path: str | None = None) -> list[dict[str, Any]]:
        if path is None:
            rows = load_rows(DATA_DIR / f"{split}.jsonl")
        else:
            source = Path(path)
            dataset = self.options.get("dataset")
            if source.is_dir():
                if dataset not in DATASETS:
                    raise ValueError(f"with a directory, set env.options.dataset to one of {', '.join(DATASETS)}")
                names = [split] if split == "train" else ["dev", "test"]
                candidates = [source / DATASETS[dataset] / f"{n}.{ext}" for n in names for ext in ("jsonl", "parquet")]
                found = [c for c in candidates if c.is_file()]
                if not found:
                    raise FileNotFoundError(f"none of {', '.join(map(str, candidates))} exists")
                source = found[0]
            rows = load_rows(source)
        if "hops" in self.options:
            hops = self.options["hops"]
            allowed = set(hops) if isinstance(hops, (list, tuple)) else {hops}
            rows = [r for r in rows if r.get("hops") in allowed]
        return rows

    def make_task(self, row: dict[str, Any], index: int) -> Task:
        template = SHORT_PROMPT if self.options.get("prompt") == "short" else SEARCH_R1_PROMPT
        question = row["question"].strip()
        if not question.endswith("?"):
            question += "?"
        return Task(
            id=str(row.get("id", index)),
            messages=[{"role": "user", "content": template.format(question=question)}],
            answer=golden_answers(row),
            metadata={"question": question},
        )

    def reward(self, task: Task, trajectory: Trajectory) -> Reward:
        """Exact match (the Search-R1 reward); F1 is reported alongside. A trajectory that never
        gives a well-formed ``<answer>`` scores 0."""
        if trajectory.answer is None:
            return Reward(0.0, False, info={"em": 0.0, "f1": 0.0, "answered": 0.0})
        em = exact_match(trajectory.answer, task.answer)
        return Reward(em, bool(em), info={"em": em, "f1": f1_score(trajectory.answer, task.answer), "answered": 1.0})
