"""Search self-play (SSP; Lu et al., "Search Self-Play", arXiv 2510.18821; code Alibaba-Quark/SSP at
b4797e1, package ``quarl``): one policy proposes questions for given answers and solves them.

The pure parts of a step, in order:

1. :func:`proposer_messages` (answer ``a*``, hop count ``n``) -> the proposer's search rollout;
   :func:`proposer_output` reads what it wrote, searched and retrieved from the trajectory.
2. :func:`extract_question` and :func:`check_rules` (the rule filters), then
   :func:`agentrl.algos.self_play_check.check_questions`, which runs the RAG check: the policy
   itself answers the question with no tools from the proposer's retrieved documents plus ``k``
   distractor blocks (the judge, an option, is there too).
3. :func:`solver_messages` for each valid question; ``self_play_check.score_solver`` /
   :func:`solver_reward`.
4. :func:`proposer_reward` from the solver success; :class:`ProblemPool` fills invalid slots.
5. :func:`self_play_metrics` for the step's log line.

Where this differs from the reference code (``quarl/utils/problem_extraction.py``,
``ssp_ray_trainer.py``, ``ssp_data_manager.py``) each function says so; docs/self_play.md lists it all.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from agentrl.envs.search_qa import SEARCH_R1_PROMPT, SHORT_PROMPT, SearchQAEnv, normalize_answer
from agentrl.parsing import THINK_BLOCK
from agentrl.trajectory import Trajectory

Messages = list[dict[str, Any]]

# -- prompts -------------------------------------------------------------------------------------

# The reference's proposer instruction (examples/data_preprocess/preprocess_ssp_train_dataset.py),
# same structure and rules, worded for this toolkit's tags.
PROPOSER_SYSTEM_PROMPT = (
    "You are an expert question creator. You are given an answer; reverse-engineer a challenging question "
    "whose unique answer it is. Solving the question must take {hops} sequential searches.\n"
    "Work backwards from the answer: search for the answer to find an associated concept (a person, place or "
    "organisation a document connects to it), then search that concept for the fact that precedes it, and so on "
    "until the chain has {hops} links. Make one search per link.\n"
    "Reason inside <think> and </think>. Search with <search> query </search>; the results come back between "
    "<information> and </information>. When the chain is complete, write the question inside <question> and "
    "</question>.\n"
    "Rules:\n"
    "- Fact-based: the question rests only on facts your searches returned.\n"
    "- No spoilers: the question must not contain the answer.\n"
    "- Searching is mandatory: make exactly {hops} searches, all different.\n"
    "- Unique answer: the question must have exactly one correct answer, the one given."
)
PROPOSER_EXAMPLES = "\nExample questions:\n{examples}"
PROPOSER_USER_PROMPT = (
    "The answer I provided is: {answer}. You need to create a question that requires {hops} searches to answer, "
    "and whose answer is exactly {answer}."
)
# A shorter form for small models (the embedded default), as search_qa's SHORT_PROMPT is to Search-R1's.
PROPOSER_SHORT_PROMPT = (
    "Write a question whose answer is {answer} and which takes {hops} searches to answer. Work backwards from "
    "the answer: search with <search> query </search> (results come back in <information> </information>), one "
    "search per step of the chain, then write <question> question </question>. Do not put the answer in the "
    "question."
)
# The RAG check (reference: "Answer the given question based on the provided materials ..."), with the
# answer in the tag the policy already writes as the solver.
RAG_PROMPT = (
    "Answer the question using only the documents below; you cannot search. Give the answer inside <answer> "
    "and </answer>, without explanation.\n\n{documents}\n\nQuestion: {question}"
)
PLACEHOLDER_QUESTION = "This is a placeholder problem. Reply with <answer> none </answer>."


def proposer_messages(answer: str, hops: int, examples: Sequence[str] = (),
                      prompt: Literal["full", "short"] = "full") -> Messages:
    """The proposer's chat for answer ``a*`` and hop count ``n`` (SSP §2.3: system + user). Optional
    example questions follow the rules, as the reference's three ``sys_question_example``; the
    bundled answers carry none (no training question is read)."""
    if hops < 1:
        raise ValueError(f"hops must be at least 1, not {hops}")
    if prompt == "short":
        text = PROPOSER_SHORT_PROMPT.format(answer=answer, hops=hops)
        if examples:
            text += PROPOSER_EXAMPLES.format(examples="\n".join(f"- {e}" for e in examples))
        return [{"role": "user", "content": text}]
    system = PROPOSER_SYSTEM_PROMPT.format(hops=hops)
    if examples:
        system += PROPOSER_EXAMPLES.format(examples="\n".join(f"- {e}" for e in examples))
    return [{"role": "system", "content": system},
            {"role": "user", "content": PROPOSER_USER_PROMPT.format(answer=answer, hops=hops)}]


def solver_messages(question: str, prompt: Literal["search_r1", "short"] = "short") -> Messages:
    """The solver's chat: search_qa's own instruction (reference: the Search-R1 prompt)."""
    template = SHORT_PROMPT if prompt == "short" else SEARCH_R1_PROMPT
    question = question.strip()
    return [{"role": "user", "content": template.format(question=question if question.endswith("?") else question + "?")}]


def rag_messages(question: str, documents: Sequence[str]) -> Messages:
    """The RAG check's chat: the question and the numbered documents, no tools."""
    body = "\n\n".join(f"Document {i}:\n{d}" for i, d in enumerate(documents, start=1))
    return [{"role": "user", "content": RAG_PROMPT.format(documents=body, question=question)}]


# -- reading a proposer trajectory ----------------------------------------------------------------

QUESTION_TAG = re.compile(r"<question>(.*?)</question>", re.DOTALL)
INFORMATION_BLOCK = re.compile(r"<information>(.*?)</information>", re.DOTALL)
NO_RESULTS = "No results."


@dataclass
class ProposerOutput:
    """What a proposer trajectory holds, each part from where the policy cannot forge it: ``text`` is
    the policy's own turns (assistant spans); ``queries`` the searches that ran (the rollout's tool-call
    records, status ``ok``); ``documents`` the tool output blocks (observation spans of turns whose
    every call was a successful search)."""

    text: str
    queries: list[str] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)


def proposer_output(trajectory: Trajectory, tokenizer: Any = None, search_tool: str = "search",
                    final_turn_message: str = SearchQAEnv.final_turn_message) -> ProposerOutput:
    """Split a finished proposer trajectory into its own text, searches and retrieved blocks.

    The reference regex-matches ``<search>`` and ``<information>`` over the whole decoded text, so a
    policy that writes ``<information>…</information>`` itself forges its own evidence. Here documents
    come only from observation spans and queries only from executed calls. Uses the rollout's
    ``metadata["span_text"]``, or decodes the spans with ``tokenizer``.
    """
    texts = trajectory.metadata.get("span_text")
    if texts is None or len(texts) != len(trajectory.turns):
        if tokenizer is None:
            raise ValueError(f"trajectory {trajectory.id} has no span_text; pass the tokenizer to decode its spans")
        texts = [tokenizer.decode(trajectory.response_ids[s.start:s.end]) for s in trajectory.turns]
    # A turn's tool output is evidence only if every call of that turn was a search that succeeded:
    # an error message or another tool's output can echo text the policy wrote.
    searched = {c.turn for c in trajectory.tool_calls if c.tool == search_tool and c.status == "ok"}
    searched -= {c.turn for c in trajectory.tool_calls if c.tool != search_tool or c.status != "ok"}
    own, documents = [], []
    for span, text in zip(trajectory.turns, texts):
        if span.role == "assistant":
            own.append(text)
        elif span.role == "observation" and span.turn in searched:
            text = text.replace(final_turn_message.strip(), "")
            documents += [b.strip() for b in INFORMATION_BLOCK.findall(text) if b.strip() not in ("", NO_RESULTS)]
    queries = [str(next(iter(c.arguments.values()), "")) for c in trajectory.tool_calls
               if c.tool == search_tool and c.status == "ok"]
    return ProposerOutput("".join(own), queries, documents)


SEARCH_TAG = re.compile(r"<search>(.*?)</search>", re.DOTALL)


def proposer_output_from_messages(messages: Messages) -> ProposerOutput:
    """The same split for a chat (a demonstration): assistant contents, their ``<search>`` queries,
    and the ``tool`` messages' contents as the retrieved blocks."""
    own = [str(m["content"]) for m in messages if m["role"] == "assistant"]
    queries = [" ".join(q.split()) for text in own for q in SEARCH_TAG.findall(THINK_BLOCK.sub("", text))]
    documents = [str(m["content"]).strip() for m in messages
                 if m["role"] == "tool" and str(m["content"]).strip() not in ("", NO_RESULTS)]
    return ProposerOutput("".join(own), queries, documents)


def extract_question(text: str) -> str | None:
    """The first ``<question>…</question>`` outside ``<think>`` (reference: the first match of
    ``self_play.answer_pattern = question``); ``None`` when there is none or it is empty."""
    match = QUESTION_TAG.search(THINK_BLOCK.sub("", text))
    question = " ".join(match.group(1).split()) if match else ""
    return question or None


# -- rule filters ----------------------------------------------------------------------------------

REJECTION_REASONS: tuple[str, ...] = (
    "no_question", "too_short", "too_long", "answer_in_question", "no_documents", "too_few_searches",
    "repeated_search", "answer_in_query", "rag_wrong_answer", "rag_engine_error", "judge_error",
    "rollout_error",  # the proposer's rollout failed for a reason not the policy's (infra, tool session)
)


@dataclass
class QuestionRules:
    """The rule filters' bounds; defaults are the reference's (``_is_valid_search_question``)."""

    min_chars: int = 10
    max_chars: int = 1000
    min_words: int = 10
    min_searches: int = 2
    allow_repeated_searches: bool = False
    forbid_answer_in_queries: bool = False  # reference: use_search_terms_filter = False


def _compact(text: str) -> str:
    return normalize_answer(text).replace(" ", "")


def contains_answer(text: str, answer: str) -> bool:
    """Whether ``answer`` appears in ``text`` after SQuAD normalisation with spaces removed. Stricter
    than the reference's lower-cased substring test: ``Shys-krom`` and ``S hyskrom`` count as
    ``Shyskrom`` (a spoiler the policy could learn), at the cost of rejecting a question that
    contains the answer inside a longer word."""
    needle = _compact(answer)
    return bool(needle) and needle in _compact(text)


def check_rules(output: ProposerOutput, answer: str, rules: QuestionRules | None = None) -> str | None:
    """The first rule the trajectory breaks, as one of :data:`REJECTION_REASONS`, or ``None``.

    Order and bounds follow the reference: question tag; ``min_chars <= len(q) <= max_chars`` and at
    least ``min_words`` whitespace words; ``a*`` not in ``q``; at least one retrieved block; at least
    ``min_searches`` distinct searches (whitespace and case folded), none repeated; optionally ``a*``
    in no query.
    """
    rules = rules or QuestionRules()
    question = extract_question(output.text)
    if question is None:
        return "no_question"
    if len(question) < rules.min_chars or len(question.split()) < rules.min_words:
        return "too_short"
    if len(question) > rules.max_chars:
        return "too_long"
    if contains_answer(question, answer):
        return "answer_in_question"
    if not output.documents:
        return "no_documents"
    folded = [" ".join(q.lower().split()) for q in output.queries]
    if len(set(folded)) < rules.min_searches:
        return "too_few_searches"
    if not rules.allow_repeated_searches and len(set(folded)) < len(folded):
        return "repeated_search"
    if rules.forbid_answer_in_queries and any(contains_answer(q, answer) for q in output.queries):
        return "answer_in_query"
    return None


# -- reading answers ------------------------------------------------------------------------------

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_answer(text: str) -> str | None:
    """The last ``<answer>…</answer>`` outside ``<think>`` (reference reward: the last match)."""
    matches = ANSWER_TAG.findall(THINK_BLOCK.sub("", text))
    return matches[-1].strip() if matches else None


@dataclass
class Verdict:
    """One proposer trajectory's outcome: valid or the reason it was rejected."""

    valid: bool
    reason: str | None = None
    question: str | None = None
    rag_ran: bool = False
    rag_answer: str | None = None


# -- rewards -----------------------------------------------------------------------------------------


def answer_tag_spam(text: str, limit: int = 10) -> bool:
    """More than ``limit`` ``<answer>`` or more than ``limit`` ``</answer>`` tags in the policy's own
    text (reference ``quark_score.py``: the anti-hacking rule)."""
    return text.count("<answer>") > limit or text.count("</answer>") > limit


def solver_reward(correct: bool, spam: bool, spam_divisor: float = 4.0) -> float:
    """``r = 1[correct] / (4 if spam else 1)`` (reference solver reward: binary at the last token,
    divided by 4 for answer-tag spam)."""
    return float(correct) / (spam_divisor if spam else 1.0)


ProposerRewardMode = Literal["1-acc", "intermediate_difficulty", "format_only"]


def solve_rate(solver_rewards: Sequence[float]) -> float:
    """``acc_i = mean_j 1[r_ij > 0]`` (reference: a spam-divided correct answer still counts)."""
    if not solver_rewards:
        raise ValueError("a valid question needs at least one scored solver attempt to be rewarded")
    return sum(r > 0 for r in solver_rewards) / len(solver_rewards)


def proposer_reward(valid: bool, solver_rewards: Sequence[float], mode: ProposerRewardMode = "1-acc",
                    invalid_penalty: float = 0.0) -> float:
    """The proposer's reward (reference ``_compute_proposer_rewards``), with ``acc`` = :func:`solve_rate`:

    - ``1-acc``: ``R = 1 − acc`` (the paper's adversarial reward; the shipped script);
    - ``intermediate_difficulty``: ``R = 4·acc·(1 − acc)·1[0 < acc < 1]``;
    - ``format_only``: ``R = 1``;
    - an invalid question (rejected, or a placeholder): ``R = invalid_penalty`` (script 0, the
      reference yaml −1; with 0 an invalid question earns what a question every attempt solves earns).
    """
    if not valid:
        return float(invalid_penalty)
    if mode == "format_only":
        return 1.0
    acc = solve_rate(solver_rewards)
    if mode == "1-acc":
        return 1.0 - acc
    if mode == "intermediate_difficulty":
        return 4.0 * acc * (1.0 - acc) if 0.0 < acc < 1.0 else 0.0
    raise ValueError(f"unknown proposer reward mode {mode!r}; use 1-acc, intermediate_difficulty or format_only")


# -- the problem pool -------------------------------------------------------------------------------


@dataclass
class Problem:
    """A question for the solver with its gold answer; ``success_rate`` is measured after solving."""

    question: str
    answer: str
    step: int = 0
    success_rate: float | None = None
    uses: int = 0
    placeholder: bool = False


class ProblemPool:
    """Past valid questions that fill the solver slots of invalid ones (reference ``SSPDataManager``,
    ``extraction_failure.strategy = reuse``).

    Each empty slot takes a uniform draw (with replacement) from the problems whose measured success
    rate is at most ``max_success_rate`` (script: 1.0, i.e. all) and, with ``max_uses``, that have
    filled fewer slots than that (script: no bound); the draw uses
    ``random.Random(f"{seed}:{step}")`` so no RNG state needs saving. Only when none qualifies is the
    slot a placeholder (marked, so the wiring can keep it out of the loss; the reference trains on its
    dummy). The pool is emptied after every ``clear_every``-th step (script: 10, ``keep_ratio = 0``).
    """

    def __init__(self, clear_every: int = 10, max_success_rate: float = 1.0, seed: int = 0,
                 max_uses: int | None = None) -> None:
        if clear_every < 1:
            raise ValueError(f"clear_every must be at least 1, not {clear_every}")
        if max_uses is not None and max_uses < 1:
            raise ValueError(f"max_uses must be at least 1 (or None: no bound), not {max_uses}")
        self.clear_every = clear_every
        self.max_success_rate = max_success_rate
        self.max_uses = max_uses
        self.seed = seed
        self.problems: list[Problem] = []
        self.reused_total = 0
        self.placeholders_total = 0

    def __len__(self) -> int:
        return len(self.problems)

    def add(self, problem: Problem) -> None:
        if problem.placeholder:
            raise ValueError("a placeholder problem cannot enter the pool")
        self.problems.append(problem)

    def fill(self, slots: Sequence[Problem | None], step: int) -> list[Problem]:
        """``slots`` with each ``None`` (an invalid question) replaced by a pool problem or a placeholder."""
        rng = random.Random(f"{self.seed}:{step}")
        eligible = [p for p in self.problems if p.success_rate is None or p.success_rate <= self.max_success_rate]
        filled = []
        for slot in slots:
            if slot is None:
                eligible = [p for p in eligible if self.max_uses is None or p.uses < self.max_uses]
            if slot is None and eligible:
                slot = rng.choice(eligible)
                slot.uses += 1
                self.reused_total += 1
            elif slot is None:
                slot = Problem(PLACEHOLDER_QUESTION, "none", step, placeholder=True)
                self.placeholders_total += 1
            filled.append(slot)
        return filled

    def end_step(self, step: int) -> bool:
        """Clear after every ``clear_every``-th step (1-based); returns whether it cleared."""
        if step % self.clear_every == 0:
            self.problems.clear()
            return True
        return False

    def metrics(self) -> dict[str, float]:
        return {"self_play/pool_size": float(len(self.problems)),
                "self_play/pool_reused_total": float(self.reused_total),
                "self_play/placeholders_total": float(self.placeholders_total),
                "self_play/pool_max_uses": float(max((p.uses for p in self.problems), default=0))}

    def state_dict(self) -> dict[str, Any]:
        """The pool's contents and totals; its settings come from the run's config, so that a run
        resumed with other settings (a bound added since) uses them."""
        return {"problems": [asdict(p) for p in self.problems], "reused_total": self.reused_total,
                "placeholders_total": self.placeholders_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.problems = [Problem(**p) for p in state["problems"]]
        self.reused_total, self.placeholders_total = state["reused_total"], state["placeholders_total"]


# -- metrics -----------------------------------------------------------------------------------------


def self_play_metrics(verdicts: Sequence[Verdict], proposer_rewards: Sequence[float],
                      solver_rewards: Sequence[Sequence[float]], reused: int = 0,
                      placeholders: int = 0) -> dict[str, float]:
    """One step's self-play metrics: valid-question rate, a count per rejection reason (every reason,
    zeros included, so each curve exists from step 1), the RAG pass rate over the questions that
    reached it, solver accuracy over attempts on this step's valid questions (``solver_rewards[i]``
    for verdict ``i``; empty for invalid ones), the proposer's mean reward, and the slots filled
    from the pool or with a placeholder."""
    total = len(verdicts)
    reasons = Counter(v.reason for v in verdicts if not v.valid)
    metrics = {"self_play/valid_rate": sum(v.valid for v in verdicts) / total if total else 0.0}
    metrics.update({f"self_play/rejected/{r}": float(reasons.get(r, 0)) for r in REJECTION_REASONS})
    checked = [v for v in verdicts if v.rag_ran]
    if checked:
        metrics["self_play/rag_pass_rate"] = sum(v.valid for v in checked) / len(checked)
    attempts = [r for v, rs in zip(verdicts, solver_rewards, strict=True) if v.valid for r in rs]
    if attempts:
        metrics["self_play/solver_accuracy"] = sum(r > 0 for r in attempts) / len(attempts)
    if proposer_rewards:
        metrics["self_play/proposer_reward"] = sum(proposer_rewards) / len(proposer_rewards)
    metrics["self_play/reused_slots"] = float(reused)
    metrics["self_play/placeholder_slots"] = float(placeholders)
    return metrics
