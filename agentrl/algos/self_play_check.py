"""Search self-play's checks that call a model: the self-verified RAG check (the policy answers a
proposed question with no tools from the proposer's documents plus distractors), the optional
OpenAI-compatible judge with its failure policy, and the solver's score (which may ask the judge).

The pure parts they use (prompts, extraction, rule filters, rewards) are in
:mod:`agentrl.algos.self_play`; docs/self_play.md describes both.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from agentrl.algos.self_play import (
    ProposerOutput,
    QuestionRules,
    Verdict,
    answer_tag_spam,
    check_rules,
    contains_answer,
    extract_question,
    last_answer,
    rag_messages,
    solver_reward,
)
from agentrl.engines.base import GenerationResult, SamplingParams
from agentrl.envs.search_qa import normalize_answer

# -- the judge (option) ------------------------------------------------------------------------------

JUDGE_PROMPT = (
    "Decide whether a predicted answer to a question is correct, that is, names the same thing as the gold "
    "answer.\nQuestion: {question}\nGold answer: {gold}\nPredicted answer (between the markers, which are not "
    "part of it): <<<{predicted}>>>\nReply with one word: Correct or Incorrect."
)


class JudgeError(RuntimeError):
    """The judge endpoint did not give a verdict (unreachable, timed out, an error status, or a reply
    that is neither Correct nor Incorrect) after its retries."""


@dataclass
class Judge:
    """An OpenAI-compatible chat endpoint (``self_play.judge_url``, e.g. ``http://127.0.0.1:5000/v1``)
    that decides semantic matches (reference ``quarl/utils/llm_as_a_judge.py``, ``model_based_match``).

    Failure policy, retry then reject: transport errors, timeouts (``timeout_s`` per attempt), 429 and
    5xx are retried up to ``attempts`` times with jittered backoff; other statuses, malformed bodies and
    unparseable verdicts fail at once. Then :class:`JudgeError` is raised and counted in ``errors``;
    the callers turn it into a rejected question or an unscored solver trajectory, never a pass
    (the reference returns True on any judge exception). The predicted answer is policy text: one
    longer than ``max_answer_chars`` is never sent (it is not a match), which bounds what an
    injected instruction can say; the exact-match test runs first and needs no judge.
    """

    url: str
    model: str = "judge"
    timeout_s: float = 30.0
    attempts: int = 3
    max_answer_chars: int = 200
    errors: int = 0

    async def correct(self, question: str, gold: str, predicted: str) -> bool:
        if len(predicted) > self.max_answer_chars:
            return False
        payload = {"model": self.model, "temperature": 0.0, "max_tokens": 8, "messages": [
            {"role": "user", "content": JUDGE_PROMPT.format(question=question, gold=gold, predicted=predicted)}]}
        try:
            async for attempt in AsyncRetrying(retry=retry_if_exception(_retryable), reraise=True,
                                               stop=stop_after_attempt(self.attempts),
                                               wait=wait_random_exponential(multiplier=0.1, max=2.0)):
                with attempt:
                    async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                        response = await client.post(f"{self.url.rstrip('/')}/chat/completions", json=payload)
                    response.raise_for_status()
            reply = str(response.json()["choices"][0]["message"]["content"]).strip().lower()
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as error:
            self.errors += 1
            raise JudgeError(f"judge {self.url} gave no verdict: {type(error).__name__}: {error}") from None
        for verdict, value in (("incorrect", False), ("correct", True)):
            if reply.startswith(verdict):
                return value
        self.errors += 1
        raise JudgeError(f"judge {self.url} replied {reply[:60]!r}; expected Correct or Incorrect")


def _retryable(error: BaseException) -> bool:
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code == 429 or error.response.status_code >= 500
    return isinstance(error, httpx.TransportError)


# -- the RAG check ---------------------------------------------------------------------------------


class GenerateEngine(Protocol):
    """Any engine with the agentrl ``generate`` interface (HF, vLLM, OpenAI-compatible, scripted)."""

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult: ...


def rag_documents(own: Sequence[str], others: Sequence[Sequence[str]], distractors: int, answer: str,
                  rng: random.Random) -> list[str]:
    """The RAG check's documents: the proposer's blocks plus ``distractors`` blocks drawn without
    replacement from other trajectories' blocks, shuffled together (reference: ``noisy_RAG_materials
    = 4``, ``extract_problems_batch``).

    Unlike the reference, a candidate distractor that contains ``a*`` (normalised) or repeats one of
    the proposer's blocks is never drawn: a distractor is noise, and one holding the answer could
    pass a question the proposer's own documents do not support.
    """
    mine = set(own)
    pool = sorted({b for blocks in others for b in blocks if b not in mine and not contains_answer(b, answer)})
    chosen = rng.sample(pool, min(distractors, len(pool)))
    documents = list(own) + chosen
    rng.shuffle(documents)
    return documents


@dataclass
class RagResult:
    passed: bool
    reason: str | None = None  # a rejection reason when not passed
    predicted: str | None = None


async def rag_check(engine: GenerateEngine, tokenizer: Any, question: str, answer: str,
                    documents: Sequence[str], params: SamplingParams | None = None,
                    judge: Judge | None = None) -> RagResult:
    """Can the policy, with no tools, answer ``question`` from ``documents``? (SSP §2.4.)

    The paper has the policy answer; the released code asks an external judge model. This is the
    paper's self-verified form: ``engine`` samples from the policy (greedy by default, where the
    reference's judge samples at 0.1) and the answer passes by normalised exact match, or, when
    ``judge`` is set, by the judge's semantic match. Policy: an engine error or a judge that still
    fails after its retries *rejects* the question with its own reason (``rag_engine_error``,
    ``judge_error``), counted in the metrics; the reference passes it.
    """
    params = params or SamplingParams(max_new_tokens=64, temperature=0.0, stop=["</answer>"])
    prompt = tokenizer.apply_chat_template(rag_messages(question, documents), add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    try:
        result = await engine.generate(list(prompt), params)
    except Exception:  # an engine failure costs this question, never the step
        return RagResult(False, "rag_engine_error")
    if result.finish_reason == "abort":
        return RagResult(False, "rag_engine_error")
    predicted = last_answer(tokenizer.decode(result.token_ids, skip_special_tokens=True))
    if predicted is None:
        return RagResult(False, "rag_wrong_answer")
    try:
        correct = await answer_matches(predicted, answer, question, judge)
    except JudgeError:
        return RagResult(False, "judge_error", predicted)
    return RagResult(correct, None if correct else "rag_wrong_answer", predicted)


async def answer_matches(predicted: str, answer: str, question: str, judge: Judge | None = None) -> bool:
    """Normalised exact match, then (if configured) the judge: the reference's order."""
    if normalize_answer(predicted) == normalize_answer(answer):
        return True
    return judge is not None and await judge.correct(question, answer, predicted)


async def check_questions(engine: GenerateEngine, tokenizer: Any, outputs: Sequence[ProposerOutput],
                          answers: Sequence[str], seed: int, rules: QuestionRules | None = None,
                          distractors: int = 4, params: SamplingParams | None = None,
                          judge: Judge | None = None) -> list[Verdict]:
    """The rule filters, then the RAG check on the survivors, all concurrently.

    Distractors come from every other trajectory of the batch; trajectory ``i`` draws them with
    ``random.Random(f"{seed}:{i}")``, so a step (seed = step) repeats exactly after a resume.
    """
    verdicts = []
    for output, answer in zip(outputs, answers, strict=True):
        reason = check_rules(output, answer, rules)
        verdicts.append(Verdict(reason is None, reason, extract_question(output.text)))

    async def verify(index: int) -> None:
        others = [o.documents for j, o in enumerate(outputs) if j != index]
        documents = rag_documents(outputs[index].documents, others, distractors, answers[index],
                                  random.Random(f"{seed}:{index}"))
        result = await rag_check(engine, tokenizer, verdicts[index].question, answers[index], documents, params, judge)
        verdict = verdicts[index]
        verdict.rag_ran, verdict.rag_answer, verdict.valid, verdict.reason = True, result.predicted, result.passed, result.reason

    await asyncio.gather(*(verify(i) for i, v in enumerate(verdicts) if v.valid))
    return verdicts


# -- the solver's score ------------------------------------------------------------------------


@dataclass
class SolverScore:
    reward: float
    correct: bool
    spam: bool
    judge_error: str | None = None  # set: the wiring marks the trajectory reward_error (out of the loss)


async def score_solver(predicted: str | None, answer: str, question: str, own_text: str,
                       judge: Judge | None = None, spam_limit: int = 10) -> SolverScore:
    """A solver trajectory's reward: normalised exact match of its answer (plus the judge if set),
    divided by 4 on answer-tag spam. No answer scores 0. A judge that fails after its retries is
    not scored 0 (that would punish the policy for the judge): ``judge_error`` says why, and the
    trajectory is to be left out of the loss and of its group's baseline."""
    spam = answer_tag_spam(own_text, spam_limit)
    if predicted is None:
        return SolverScore(0.0, False, spam)
    try:
        correct = await answer_matches(predicted, answer, question, judge)
    except JudgeError as error:
        return SolverScore(0.0, False, spam, str(error))
    return SolverScore(solver_reward(correct, spam), correct, spam)
