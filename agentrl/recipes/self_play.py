"""Search self-play (SSP; Lu et al., arXiv 2510.18821) as a recipe: one policy proposes questions for
given answers and solves them, both roles trained on the same weights each step.

The step, in the recipe's parts (docs/self_play.md has the rules of each piece)::

    collect       1. proposer rollouts: the next answers (a*, n) of the answers file, one search rollout
                     each at the proposer's temperature, ending in <question>; with dynamic sampling,
                     further rounds on the next answers while fewer questions than slots are valid
                  2. the question extracted, the rule filters, then the RAG check: the policy answers
                     with no tools from the proposer's documents plus k distractor blocks (or the judge)
                  3. solver rollouts: n_solve per valid question at the solver's temperature; the
                     slot of an invalid one takes a pool problem (a placeholder only if the pool is empty)
    score         solver: normalised exact match (or the judge), /4 on answer-tag spam;
                  proposer: 1-acc | intermediate_difficulty | format_only of its question's attempts,
                  invalid_penalty when invalid
    select        out: placeholder slots, unscored trajectories
    loss_batches  "proposer" (reinforce_pp over the step's proposals, or GRPO over them as one group),
                  then "solver" (GRPO over each question's n_solve attempts); or one combined batch;
                  only the roles in self_play.train_roles
    after_update  the step's valid questions enter the pool with their solve rate; cleared every K steps
    state_dict    the pool and the position in the answer stream: a resumed run repeats exactly

Self-play reads the answers file and nothing else: the run's training split is emptied here, and a
warm start must come from ``sft.data`` (scripted demonstrations of both roles, see
``agentrl.envs.self_play_data``), never from training questions.
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import torch

from agentrl.algos.self_play import (
    Problem,
    ProblemPool,
    ProposerOutput,
    QuestionRules,
    Verdict,
    proposer_output,
    proposer_reward,
    self_play_metrics,
    solve_rate,
)
from agentrl.algos.self_play_check import Judge, check_questions, score_solver
from agentrl.engines.base import SamplingParams
from agentrl.envs.self_play_data import ANSWERS_PATH, SelfPlayProposerEnv, load_answers
from agentrl.recipes.base import Recipe, step_seed, tool_use_metrics
from agentrl.rollout import RolloutWorker, rollout_metrics
from agentrl.trainer.batching import collate
from agentrl.trainer.update import LossBatch
from agentrl.trajectory import Trajectory

ROLE = "self_play"  # trajectory.metadata key: the role and what the viewer shows about it


class SelfPlayRecipe(Recipe):
    def __init__(self, run: Any) -> None:
        super().__init__(run)
        config, options = self.config, self.config.self_play
        if config.algo.dynamic_sampling:
            raise ValueError("recipe self_play draws more proposals, not more solver groups: set algo.dynamic_sampling="
                             "false and self_play.dynamic_sampling_max_draws instead")
        if config.sft.enabled and not config.sft.data:
            raise ValueError("recipe self_play reads no training question, so the warm start needs sft.data (e.g. "
                             "python -m agentrl.envs.self_play_data --demonstrations PATH)")
        if config.rollout.partial.enabled:
            raise ValueError("recipe self_play runs whole proposer and solver batches: set rollout.partial.enabled=false")
        run.train_rows = []  # self-play never reads a training question
        rows = load_answers(options.answers or ANSWERS_PATH)
        self.answers = [r for r in rows if not options.hops or r["hops"] in options.hops]
        if not self.answers:
            raise ValueError(f"no answers with hops in {options.hops} in {options.answers or ANSWERS_PATH}")
        self.answer_position = 0
        self.pool = ProblemPool(options.pool_clear_every, options.pool_max_success_rate, config.trainer.seed,
                                max_uses=options.pool_max_uses)
        self.rules = QuestionRules(options.min_chars, options.max_chars, options.min_words, options.min_searches,
                                   options.allow_repeated_searches, options.forbid_answer_in_queries)
        self.judge = Judge(options.judge_url, options.judge_model, options.judge_timeout_s, options.judge_attempts) \
            if options.judge_url else None
        self.rag_params = SamplingParams(max_new_tokens=options.rag_max_new_tokens, temperature=0.0, stop=["</answer>"])
        # The two roles' workers share the run's engine, tokenizer and tool executor (the search tool
        # the solver env uses); each samples at its own temperature.
        self.proposer_env = SelfPlayProposerEnv(prompt=options.proposer_prompt)
        rollout = config.rollout
        proposer_rollout = rollout.model_copy(update={
            "temperature": rollout.temperature if options.proposer_temperature is None else options.proposer_temperature,
            "max_turns": options.proposer_max_turns or rollout.max_turns})
        solver_rollout = rollout.model_copy(update={
            "temperature": rollout.temperature if options.solver_temperature is None else options.solver_temperature})
        if options.combine_update and proposer_rollout.temperature != solver_rollout.temperature:
            warnings.warn(f"self_play.combine_update scores both roles in one batch at rollout.temperature="
                          f"{rollout.temperature:g}, but they sample at {proposer_rollout.temperature:g} and "
                          f"{solver_rollout.temperature:g}: the ratio of a role sampled at another temperature is "
                          "taken against another distribution than the one sampled", UserWarning, stacklevel=2)
        self.proposer_worker = RolloutWorker(run.engine, run.tokenizer, self.proposer_env, run.executor,
                                             proposer_rollout, config.tools)
        self.solver_worker = RolloutWorker(run.engine, run.tokenizer, run.env, run.executor, solver_rollout, config.tools)
        self.current: dict[str, Any] = {}  # the step in flight: its verdicts and slots, from collect to after_update

    # -- the answer stream ------------------------------------------------------------------------

    def next_answers(self, count: int) -> list[tuple[int, dict[str, Any]]]:
        """The next ``count`` answer rows with their stream positions: a seeded random order,
        reshuffled every epoch, so the position alone says where a resumed run continues."""
        rows, seed = self.answers, self.config.trainer.seed
        drawn = []
        for position in range(self.answer_position, self.answer_position + count):
            epoch, offset = divmod(position, len(rows))
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 7919 + 31 + epoch))
            drawn.append((position, rows[int(order[offset])]))
        self.answer_position += count
        return drawn

    # -- the parts --------------------------------------------------------------------------------

    def collect(self, step: int) -> tuple[list[Trajectory], dict[str, float]]:
        """Proposer rollouts, their questions checked (more rounds on the next answers while too few are
        valid, with ``self_play.dynamic_sampling_max_draws``), solver rollouts on the valid ones (or the pool)."""
        run, options = self.run, self.config.self_play
        seed = step_seed(self.config, step)
        count = options.answers_per_step or self.config.trainer.prompts_per_step
        rows, proposers, verdicts, rounds = [], [], [], 0
        while True:
            drawn = self.next_answers(count)
            # round 0 samples at the step's seed, as without dynamic sampling; the solver has seed + 1
            round_trajectories, _, round_verdicts = self.propose(
                drawn, step, seed if rounds == 0 else seed + 1 + rounds, first_index=len(proposers))
            rows += drawn
            proposers += round_trajectories
            verdicts += round_verdicts
            rounds += 1
            if sum(v.valid for v in verdicts) >= count or rounds > options.dynamic_sampling_max_draws:
                break
        self._raise_on_judge_failure(verdicts)
        answers = [row["answer"] for _, row in rows]
        # the first round's proposals own the solver slots; a later round's valid question takes the
        # slot of an invalid one (then a new slot), so without an extra round slot i is proposal i
        slots: list[Problem | None] = [Problem(v.question, a, step) if v.valid else None
                                       for v, a in zip(verdicts[:count], answers[:count], strict=True)]
        slot_of: list[int | None] = list(range(count))
        open_slots = iter([index for index, slot in enumerate(slots) if slot is None])
        for verdict, answer in zip(verdicts[count:], answers[count:], strict=True):
            slot = next(open_slots, None) if verdict.valid else None
            if slot is not None:
                slot_of[slot] = None  # the invalid first-round proposal whose slot this question takes
                slots[slot] = Problem(verdict.question, answer, step)
            elif verdict.valid:
                slot = len(slots)
                slots.append(Problem(verdict.question, answer, step))
            slot_of.append(slot)
        problems = self.pool.fill(slots, step)
        sources = ["proposed" if s is not None else ("placeholder" if p.placeholder else "pool")
                   for s, p in zip(slots, problems, strict=True)]
        solver_tasks = []
        for index, problem in enumerate(problems):
            task = run.env.make_task({"question": problem.question, "golden_answers": [problem.answer]}, index)
            task.id = f"solve-{step}-{index}"
            solver_tasks.append(task)
        solved = run.loop.run_until_complete(self.solver_worker.run_batch(solver_tasks, seed=seed + 1,
                                                                          group_size=options.n_solve))
        for trajectory, verdict, row, slot in zip(proposers, verdicts, rows, slot_of, strict=True):
            trajectory.metadata[ROLE] = {
                "role": "proposer", "slot": slot, "answer": row[1]["answer"], "hops": row[1]["hops"],
                "question": verdict.question, "valid": verdict.valid, "reason": verdict.reason,
                "rag_checked": verdict.rag_ran, "rag_answer": verdict.rag_answer, "solver_attempts": [],
                # what the solver attempts of this slot were at (None: a later round's question took it)
                "slot_source": None if slot is None else sources[slot]}
        for trajectory in solved.trajectories:
            index = int(trajectory.group_id.rsplit("-", 1)[1])
            problem = problems[index]
            trajectory.metadata[ROLE] = {"role": "solver", "slot": index, "question": problem.question,
                                         "answer": problem.answer, "source": sources[index]}
        self.current = {"verdicts": verdicts, "problems": problems, "sources": sources, "solve_rates": {}}
        metrics = {f"proposer/{k}": v for k, v in {**rollout_metrics(proposers), **tool_use_metrics(proposers)}.items()}
        metrics.update({**solved.metrics, **tool_use_metrics(solved.trajectories),
                        "self_play/proposal_rounds": float(rounds)})
        return proposers + solved.trajectories, metrics

    def propose(self, rows: list[tuple[int, dict[str, Any]]], step: int, seed: int, first_index: int = 0
                ) -> tuple[list[Trajectory], list[ProposerOutput], list[Verdict]]:
        """One round of proposer rollouts on ``rows`` (answer-stream positions and rows), what each
        proposed and its verdict (the RAG check's distractors come from this round's other proposals)."""
        run, options = self.run, self.config.self_play
        tasks = []
        for position, row in rows:
            task = self.proposer_env.make_task(row, position)
            task.id = f"propose-{step}-{first_index + len(tasks)}@{position}"
            tasks.append(task)
        proposed = run.loop.run_until_complete(self.proposer_worker.run_batch(tasks, seed=seed, group_size=1))
        outputs = [proposer_output(t, run.tokenizer, final_turn_message=self.proposer_env.final_turn_message)
                   for t in proposed.trajectories]
        verdicts = run.loop.run_until_complete(check_questions(
            run.engine, run.tokenizer, outputs, [row["answer"] for _, row in rows], seed=seed, rules=self.rules,
            distractors=options.distractors, params=self.rag_params, judge=self.judge))
        for trajectory, verdict in zip(proposed.trajectories, verdicts, strict=True):
            if not trajectory.trainable:  # a failed rollout (infra, tool session) proposes nothing
                verdict.valid, verdict.reason = False, "rollout_error"
        return proposed.trajectories, outputs, verdicts

    def score(self, trajectories: list[Trajectory], step: int) -> dict[str, float]:
        """The solver rewards, then each proposer's reward from its own question's attempts."""
        options = self.config.self_play
        solvers = [t for t in trajectories if t.metadata.get(ROLE, {}).get("role") == "solver"]
        proposers = [t for t in trajectories if t.metadata.get(ROLE, {}).get("role") == "proposer"]

        async def score_all():
            return await asyncio.gather(*(score_solver(
                t.answer, t.metadata[ROLE]["answer"], t.metadata[ROLE]["question"], own_text(t), self.judge,
                options.spam_limit) for t in solvers))

        by_slot: dict[int, list[float]] = {}
        for trajectory, result in zip(solvers, self.run.loop.run_until_complete(score_all()), strict=True):
            info = trajectory.metadata[ROLE]
            if result.judge_error is not None:
                if options.judge_failure == "raise":
                    raise RuntimeError(f"self_play.judge_failure=raise: {result.judge_error}")
                trajectory.status, trajectory.metadata["error"] = "reward_error", result.judge_error
            if not trajectory.trainable:
                trajectory.reward = None
                continue
            trajectory.reward = result.reward
            trajectory.metrics.update({"success": float(result.correct), "self_play/spam": float(result.spam)})
            if info["source"] == "proposed":
                by_slot.setdefault(info["slot"], []).append(result.reward)
        verdicts = self.current["verdicts"]
        proposer_rewards, attempts = [], []
        for trajectory in proposers:
            info = trajectory.metadata[ROLE]
            rewards = by_slot.get(info["slot"], [])
            info["solver_attempts"] = [{"answer": t.answer, "reward": t.reward} for t in solvers
                                       if t.metadata[ROLE]["slot"] == info["slot"]]
            attempts.append(rewards if info["valid"] else [])
            if not trajectory.trainable or (info["valid"] and not rewards):
                trajectory.reward = None  # a failed rollout, or a valid question none of whose attempts was scored
                continue
            trajectory.reward = proposer_reward(info["valid"], rewards, options.reward, options.invalid_penalty)
            info["solve_rate"] = solve_rate(rewards) if info["valid"] else None
            trajectory.metrics["self_play/valid"] = float(info["valid"])
            if info["solve_rate"] is not None:
                trajectory.metrics["self_play/solve_rate"] = info["solve_rate"]
                self.current["solve_rates"][info["slot"]] = info["solve_rate"]
            proposer_rewards.append(trajectory.reward)
        sources = self.current["sources"]
        return self_play_metrics(verdicts, proposer_rewards, attempts, reused=sources.count("pool"),
                                 placeholders=sources.count("placeholder"))

    def select(self, trajectories: list[Trajectory], step: int) -> tuple[list[Trajectory], list[Trajectory], dict[str, float]]:
        """The scored trajectories, less the solver attempts at placeholder problems (no signal to learn)."""
        trainable = [t for t in trajectories if t.trainable and t.reward is not None
                     and t.metadata[ROLE].get("source") != "placeholder"]
        return trainable, [], {}

    def loss_batches(self, trainable: list[Trajectory], step: int) -> tuple[list[LossBatch], dict[str, float]]:
        """``proposer`` then ``solver`` (each with its own optimizer steps), or one combined batch; only
        the roles in ``self_play.train_roles``."""
        options = self.config.self_play
        trainable = [t for t in trainable if t.metadata[ROLE]["role"] in options.train_roles]
        proposers = [t for t in trainable if t.metadata[ROLE]["role"] == "proposer"]
        solvers = [t for t in trainable if t.metadata[ROLE]["role"] == "solver"]
        if options.proposer_advantage == "grpo_batch":
            for trajectory in proposers:  # the step's proposals form one group: their mean reward is the baseline
                trajectory.group_id = f"propose-{step}"
        pad, version = self.run.tokenizer.pad_token_id, self.run.engine.policy_version
        metrics = {"self_play/proposer_trajectories": float(len(proposers)),
                   "self_play/solver_trajectories": float(len(solvers))}
        if options.combine_update:
            return ([LossBatch(collate(trainable, pad, version), trainable)] if trainable else []), metrics
        parts = []
        if proposers:
            estimator = {"reinforce_pp": "reinforce_pp", "reward": "reinforce"}.get(options.proposer_advantage)
            algo = self.config.algo.model_copy(update={"advantage": estimator}) if estimator else None
            parts.append(LossBatch(collate(proposers, pad, version), proposers, name="proposer", algo=algo,
                                   temperature=self.proposer_worker.config.temperature))
        if solvers:
            parts.append(LossBatch(collate(solvers, pad, version), solvers, name="solver",
                                   temperature=self.solver_worker.config.temperature))
        return parts, metrics

    def after_update(self, parts: list[LossBatch], step: int) -> dict[str, float]:
        """The step's valid questions enter the pool with their measured solve rate; then the pool
        is cleared if this is a ``pool_clear_every``-th step."""
        problems: list[Problem] = self.current.get("problems", [])
        rates: dict[int, float] = self.current.get("solve_rates", {})
        for slot, rate in sorted(rates.items()):  # the slots of this step's valid, scored questions
            problems[slot].success_rate = rate
            self.pool.add(problems[slot])
        metrics = self.pool.metrics()
        metrics["self_play/pool_cleared"] = float(self.pool.end_step(step))
        self.current = {}
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict(), "answer_position": self.answer_position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state["pool"])
        self.answer_position = int(state["answer_position"])

    # -- helpers ------------------------------------------------------------------------------------

    def _raise_on_judge_failure(self, verdicts: list[Verdict]) -> None:
        if self.config.self_play.judge_failure == "raise" and any(v.reason == "judge_error" for v in verdicts):
            raise RuntimeError(f"self_play.judge_failure=raise: the judge at {self.config.self_play.judge_url} gave "
                               "no verdict after its retries")


def own_text(trajectory: Trajectory) -> str:
    """The policy's own turns (assistant spans) of a trajectory, from the rollout's span texts."""
    texts = trajectory.metadata.get("span_text") or []
    return "".join(text for span, text in zip(trajectory.turns, texts) if span.role == "assistant")
