"""The self_play recipe wired into the local trainer: both roles' updates move the weights, rewards
land on the right trajectories, the problem pool fills invalid slots and is cleared, per-role
temperatures reach the engine, a resumed run repeats exactly (pool included), and a two-step run
of configs/ssp.yaml's shape trains with the tiny model.

Most tests play both roles with a scripted policy that follows the committed demonstrations (real
search tool, real tiny model in the update), so that valid questions, solved and unsolved attempts
all occur; the end-to-end runs sample from the tiny model itself."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from agentrl.envs.search_qa import normalize_answer

from agentrl.config import build_config
from agentrl.engines.base import GenerationResult
from agentrl.recipes.self_play import ROLE, SelfPlayRecipe
from agentrl.tracking import read_metrics
from agentrl.trainer.checkpoint import latest_checkpoint
from agentrl.trainer.local import build_run, close_run, train
from agentrl.trainer.update import update
from tests.helpers.resume import killed_and_resumed

ROOT = Path(__file__).resolve().parent.parent
DEMOS = [json.loads(line) for line in (ROOT / "envs/data/fictional/self_play_demonstrations.jsonl").read_text().splitlines()]
PROPOSALS = {d["answer"]: d["messages"] for d in DEMOS if d["role"] == "proposer"}
ANSWER_OF = {re.search(r"<question> (.*) </question>", d["messages"][-1]["content"]).group(1): d["answer"]
             for d in DEMOS if d["role"] == "proposer"}
SOLVER_CHATS = {d["messages"][0]["content"].rsplit("Question: ", 1)[1]: d["messages"]
                for d in DEMOS if d["role"] == "solver"}


def _turn(chat: list[dict], done: int) -> str:
    return [m["content"] for m in chat if m["role"] == "assistant"][done]


class DemoPolicy:
    """Plays the demonstrations: a proposer with a demonstration for its answer follows it (else
    asks a too-short question); the RAG reader gives the demonstrated answer; a solver follows its
    chat's searches and answers correctly on even seeds only, so groups have mixed rewards."""

    def __init__(self, tokenizer):
        self.tokenizer, self.policy_version, self.temperatures = tokenizer, 0, []

    async def generate(self, prompt_ids, params) -> GenerationResult:
        text = self.tokenizer.decode(prompt_ids)
        response = text.rsplit("<|im_start|>assistant\n", 1)[1]
        done = response.count("</search>")
        if "using only the documents below" in text:
            role, question = "rag", text.rsplit("Question: ", 1)[1].split("<|im_end|>")[0].strip()
            out = f"<answer> {ANSWER_OF.get(question, 'unknown')} </answer>"
        elif "Write a question whose answer is" in text:
            role, answer = "proposer", re.search(r"answer is (.+?) and which takes", text).group(1)
            out = _turn(PROPOSALS[answer], done) if answer in PROPOSALS else "<question> Who? </question>"
        else:
            role, question = "solver", text.rsplit("Question: ", 1)[1].split("<|im_end|>")[0].strip()
            chat = SOLVER_CHATS.get(question)
            if chat is None:  # a placeholder problem
                out = "<answer> none </answer>"
            else:
                out = _turn(chat, done)
                if out.startswith("<answer>") and (params.seed // 100) % 2:
                    out = "<answer> somewhere else </answer>"
        self.temperatures.append((role, params.temperature))
        ids = self.tokenizer.encode(out, add_special_tokens=False)
        return GenerationResult(ids, [-0.5] * len(ids), "stop", None, self.policy_version)

    def update_weights(self, state_dict=None):
        self.policy_version += 1

    async def close(self):
        pass


def answers_file(tmp_path: Path) -> Path:
    """Six answers: four with a demonstration (valid proposals), two without (invalid ones)."""
    demonstrated = [d for d in DEMOS if d["role"] == "proposer"][:4]
    rows = [{"answer": d["answer"], "hops": d["hops"]} for d in demonstrated]
    rows += [{"answer": "Qwertyville", "hops": 2}, {"answer": "1234", "hops": 2}]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ssp_config(model_dir, output_dir, answers=None, **sections) -> dict:
    """configs/ssp.yaml with the tiny model and small budgets."""
    config = yaml.safe_load((ROOT / "configs/ssp.yaml").read_text())
    config.update(output_dir=str(output_dir))
    config["model"]["name"] = str(model_dir)
    config["env"]["eval_size"] = 4
    config["env"]["train_data"] = str(ROOT / config["env"]["train_data"])
    config["sft"].update(data=str(ROOT / config["sft"]["data"]), num_demonstrations=4, epochs=1)
    config["rollout"].update(max_new_tokens=8, max_response_tokens=48, max_turns=3)
    config["trainer"].update(steps=2, prompts_per_step=3, eval_every=2, eval_before=False, torch_threads=1,
                             lr=1e-3)
    config["self_play"].update(n_solve=2, **({"answers": str(answers)} if answers else {}))
    config["tracking"] = {"progress": False, "sample_trajectories": 4}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def scripted_run(model_dir, tmp_path, **sections):
    """A built run whose rollouts and RAG checks come from :class:`DemoPolicy`; the tiny model trains."""
    sections = {"rollout": {"max_new_tokens": 64, "max_response_tokens": 1024, "max_turns": 4},
                "tools": {"options": {"search": {"topk": 3, "max_doc_chars": 90}}},  # short observations: a fast update
                "self_play": {"n_solve": 4}, **sections}
    config = build_config(ssp_config(model_dir, tmp_path / "run", answers_file(tmp_path), **sections))
    run = build_run(config)
    run.engine = DemoPolicy(run.tokenizer)
    run.recipe = SelfPlayRecipe(run)
    return run


def collect_scored(run, step=1):
    """One step's trajectories, scored, with the metrics of collecting and scoring them."""
    recipe = run.recipe
    trajectories, metrics = recipe.collect(step)
    metrics.update(recipe.score(trajectories, step))
    return trajectories, metrics


def planned_parts(run, step=1):
    """One step's trajectories, scoring metrics, trainable trajectories and loss batches; closes the run."""
    try:
        trajectories, metrics = collect_scored(run, step)
        trainable, _, _ = run.recipe.select(trajectories, step)
        parts, _ = run.recipe.loss_batches(trainable, step)
    finally:
        close_run(run)
    return trajectories, metrics, trainable, parts


def role(trajectories, name):
    return [t for t in trajectories if t.metadata[ROLE]["role"] == name]


def test_rewards_of_both_roles_land_on_their_own_trajectories(tiny_model_dir, tmp_path):
    run = scripted_run(tiny_model_dir, tmp_path, self_play={"n_solve": 4, "invalid_penalty": -0.5},
                       trainer={"prompts_per_step": 6})
    try:
        trajectories, metrics = collect_scored(run)
    finally:
        close_run(run)
    proposers, solvers = role(trajectories, "proposer"), role(trajectories, "solver")
    assert len(proposers) == 6 and len(solvers) == 24
    for solver in solvers:
        info = solver.metadata[ROLE]
        if info["source"] == "placeholder":
            continue
        correct = solver.answer is not None and normalize_answer(solver.answer) == normalize_answer(info["answer"])
        assert solver.reward == float(correct)
    valid = [p for p in proposers if p.metadata[ROLE]["valid"]]
    assert len(valid) == 4 and metrics["self_play/valid_rate"] == pytest.approx(4 / 6)
    assert metrics["self_play/rejected/too_short"] == 2 and metrics["self_play/rag_pass_rate"] == 1.0
    for proposer in proposers:
        info = proposer.metadata[ROLE]
        own = [s.reward for s in solvers if s.metadata[ROLE]["slot"] == info["slot"]]
        if info["valid"]:
            assert 0 < sum(r > 0 for r in own) < len(own)  # mixed attempts: the reward is not trivially 0 or 1
            assert proposer.reward == pytest.approx(1 - sum(r > 0 for r in own) / len(own))
            assert [a["reward"] for a in info["solver_attempts"]] == own and info["rag_answer"] == info["answer"]
        else:
            assert proposer.reward == -0.5 and info["reason"] == "too_short"
    # the invalid slots of an empty pool are placeholders, and no placeholder attempt trains
    assert metrics["self_play/placeholder_slots"] == 2
    trainable, _, _ = run.recipe.select(trajectories, 1)
    assert not any(t.metadata[ROLE].get("source") == "placeholder" for t in trainable)
    assert metrics["self_play/solver_accuracy"] == pytest.approx(
        sum(s.reward > 0 for s in solvers if s.metadata[ROLE]["source"] == "proposed") / 16)


def test_the_proposer_update_and_the_solver_update_each_change_the_weights(tiny_model_dir, tmp_path):
    run = scripted_run(tiny_model_dir, tmp_path, self_play={"n_solve": 2}, trainer={"prompts_per_step": 6, "micro_batch_size": 8})
    try:
        trajectories, _ = collect_scored(run)
        trainable, _, _ = run.recipe.select(trajectories, 1)
        parts, _ = run.recipe.loss_batches(trainable, 1)
        assert [p.name for p in parts] == ["proposer", "solver"]
        assert parts[0].algo.advantage == "reinforce_pp" and parts[1].algo is None  # the solver: the run's GRPO
        assert {t.metadata[ROLE]["role"] for t in parts[0].trajectories} == {"proposer"}
        assert len({t.group_id for t in parts[1].trajectories}) == 4  # one GRPO group per proposed question
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        first = update(run, parts[:1], 1)
        after_proposer = {k: v.clone() for k, v in run.model.state_dict().items()}
        second = update(run, parts[1:], 1)
        after_solver = run.model.state_dict()
    finally:
        close_run(run)
    assert first["proposer/grad_norm"] > 0 and second["solver/grad_norm"] > 0
    assert any(not torch.equal(before[k], after_proposer[k]) for k in before)
    assert any(not torch.equal(after_proposer[k], after_solver[k]) for k in before)


def test_the_reference_proposer_advantage_is_the_reward_itself(tiny_model_dir, tmp_path):
    """``proposer_advantage: reward``: the reference's GRPO over groups of one (A = R, no baseline),
    so an invalid or always-solved proposal gets 0 and none gets a negative advantage."""
    run = scripted_run(tiny_model_dir, tmp_path, self_play={"proposer_advantage": "reward", "n_solve": 2},
                       trainer={"prompts_per_step": 6, "micro_batch_size": 8})
    try:
        trajectories, _ = collect_scored(run)
        trainable, _, _ = run.recipe.select(trajectories, 1)
        parts, _ = run.recipe.loss_batches(trainable, 1)
        update(run, parts[:1], 1)
    finally:
        close_run(run)
    proposer = parts[0]
    assert proposer.name == "proposer" and proposer.algo.advantage == "reinforce"
    rewards = torch.tensor([t.reward for t in proposer.trajectories])
    assert rewards.min() == 0 and rewards.max() > 0  # invalid (or solved) and unsolved proposals both occur
    mask = proposer.batch.loss_mask.bool()
    expected = rewards.unsqueeze(-1).expand_as(proposer.advantages)
    assert torch.allclose(proposer.advantages[mask], expected[mask]) and (proposer.advantages[~mask] == 0).all()


def test_a_combined_update_trains_both_roles_in_one_batch(tiny_model_dir, tmp_path):
    run = scripted_run(tiny_model_dir, tmp_path, self_play={"combine_update": True, "proposer_advantage": "grpo_batch"})
    _, _, _, parts = planned_parts(run)
    assert len(parts) == 1 and parts[0].name == "policy"
    proposers = role(parts[0].trajectories, "proposer")
    assert proposers and {t.group_id for t in proposers} == {"propose-1"}  # the proposals: one GRPO group
    with pytest.raises(ValueError, match="grpo_batch"):
        build_config({"self_play": {"combine_update": True}})


@pytest.mark.parametrize("roles", [["solver"], ["proposer"]])
def test_train_roles_leaves_the_other_roles_trajectories_out_of_the_loss(tiny_model_dir, tmp_path, roles):
    run = scripted_run(tiny_model_dir, tmp_path, self_play={"n_solve": 2, "train_roles": roles},
                       trainer={"prompts_per_step": 6, "micro_batch_size": 8})
    _, metrics, trainable, parts = planned_parts(run)
    assert role(trainable, "proposer") and role(trainable, "solver")  # both sampled and scored
    assert metrics["self_play/valid_rate"] > 0
    assert [p.name for p in parts] == roles
    assert {t.metadata[ROLE]["role"] for p in parts for t in p.trajectories} == set(roles)
    with pytest.raises(ValueError, match="twice"):
        build_config({"self_play": {"train_roles": ["solver", "solver"]}})
    with pytest.raises(ValueError):
        build_config({"self_play": {"train_roles": []}})


def test_the_pool_refills_invalid_slots_and_is_cleared_every_k_steps(tiny_model_dir, tmp_path):
    run = scripted_run(tiny_model_dir, tmp_path, self_play={"n_solve": 2, "pool_clear_every": 2},
                       trainer={"prompts_per_step": 3})
    try:
        seen = []
        for step in range(1, 5):
            trajectories, metrics = collect_scored(run, step)
            trainable, _, _ = run.recipe.select(trajectories, step)
            metrics.update(run.recipe.after_update([], step))
            sources = [t.metadata[ROLE]["source"] for t in role(trajectories, "solver")][::2]
            seen.append((metrics, role(trajectories, "proposer"), sources))
    finally:
        close_run(run)
    for _, proposers, sources in seen:
        for proposer, source in zip(proposers, sources, strict=True):
            assert source == "proposed" if proposer.metadata[ROLE]["valid"] else source in ("pool", "placeholder")
    valid = [sum(p.metadata[ROLE]["valid"] for p in ps) for _, ps, _ in seen]
    assert all(valid) and not all(v == 3 for v in valid)  # every step has valid and invalid proposals
    # the pool's size at the end of each step (before a clearing), and the clearing after steps 2 and 4
    assert [m["self_play/pool_size"] for m, _, _ in seen] == [valid[0], valid[0] + valid[1], valid[2], valid[2] + valid[3]]
    assert [m["self_play/pool_cleared"] for m, _, _ in seen] == [0.0, 1.0, 0.0, 1.0]
    # an invalid slot is a placeholder only while the pool is empty (steps 1 and 3, just after a clearing)
    for index, (metrics, _, sources) in enumerate(seen):
        assert ("pool" in sources) == (index in (1, 3) and 3 - valid[index] > 0)
        assert ("placeholder" in sources) == (index in (0, 2) and 3 - valid[index] > 0)
        assert metrics["self_play/reused_slots"] == sources.count("pool")
    assert seen[-1][0]["self_play/pool_reused_total"] == sum(m["self_play/reused_slots"] for m, _, _ in seen)


def test_dynamic_sampling_draws_further_proposals_until_every_slot_has_a_valid_question(tiny_model_dir, tmp_path):
    """``dynamic_sampling_max_draws``: a step whose first round left slots without a valid question
    proposes again on the next answers; each valid question gets its own slot and attempts, the
    first round is the one a run without the option samples, and the pool fills only what is left."""
    def step_of(max_draws, path):
        run = scripted_run(tiny_model_dir, path, self_play={"n_solve": 2, "dynamic_sampling_max_draws": max_draws},
                           trainer={"prompts_per_step": 3, "seed": 1})
        try:
            trajectories, metrics = collect_scored(run)
            return trajectories, metrics, run.recipe.answer_position
        finally:
            close_run(run)

    plain, plain_metrics, plain_position = step_of(0, tmp_path / "plain")
    drawn, metrics, position = step_of(3, tmp_path / "drawn")
    assert plain_metrics["self_play/proposal_rounds"] == 1 and plain_position == 3
    assert sum(p.metadata[ROLE]["valid"] for p in role(plain, "proposer")) < 3  # the case the option is for
    proposers, solvers = role(drawn, "proposer"), role(drawn, "solver")
    rounds = metrics["self_play/proposal_rounds"]
    assert rounds >= 2 and len(proposers) == 3 * rounds and position == 3 * rounds
    # round 0 is the plain run's: the same answers, sampled at the same seeds, to the same questions
    first = [(p.id, p.metadata[ROLE]["question"]) for p in role(plain, "proposer")]
    assert [(p.id, p.metadata[ROLE]["question"]) for p in proposers[:3]] == first
    valid = [p for p in proposers if p.metadata[ROLE]["valid"]]
    assert len(valid) >= 3 and metrics["self_play/valid_rate"] == pytest.approx(len(valid) / len(proposers))
    slots = [p.metadata[ROLE]["slot"] for p in valid]
    assert sorted(slots) == list(range(len(valid)))  # one slot per valid question, no pool or placeholder slot
    assert {s.metadata[ROLE]["source"] for s in solvers} == {"proposed"} and len(solvers) == 2 * len(valid)
    for proposer in valid:
        info = proposer.metadata[ROLE]
        own = [s for s in solvers if s.metadata[ROLE]["slot"] == info["slot"]]
        assert [s.metadata[ROLE]["question"] for s in own] == [info["question"]] * 2
        assert proposer.reward == pytest.approx(1 - sum(s.reward > 0 for s in own) / 2)
    for proposer in proposers:  # an invalid proposal holds no slot once a valid question took it
        info = proposer.metadata[ROLE]
        assert info["valid"] or (info["slot"] is None and info["slot_source"] is None and info["solver_attempts"] == [])


def test_dynamic_sampling_stops_after_its_rounds_and_the_pool_fills_the_rest(tiny_model_dir, tmp_path):
    path = tmp_path / "invalid.jsonl"
    path.write_text("".join(json.dumps({"answer": a, "hops": 2}) + "\n" for a in ("Qwertyville", "1234")))
    run = scripted_run(tiny_model_dir, tmp_path, self_play={"n_solve": 2, "dynamic_sampling_max_draws": 2,
                                                            "answers": str(path)}, trainer={"prompts_per_step": 2})
    try:
        trajectories, metrics = collect_scored(run)
        position = run.recipe.answer_position
    finally:
        close_run(run)
    assert metrics["self_play/proposal_rounds"] == 3 and position == 6  # the first round and 2 more, no further
    assert len(role(trajectories, "proposer")) == 6 and metrics["self_play/valid_rate"] == 0.0
    assert [s.metadata[ROLE]["source"] for s in role(trajectories, "solver")] == ["placeholder"] * 4


def test_a_failing_judge_unscores_the_solver_attempts_it_could_not_judge_or_stops_the_run(tiny_model_dir, tmp_path):
    judge = {"judge_url": "http://127.0.0.1:9/v1", "judge_attempts": 1, "judge_timeout_s": 1.0}  # nothing listens
    run = scripted_run(tiny_model_dir, tmp_path / "reject", self_play={"n_solve": 2, **judge})
    try:
        trajectories, _ = collect_scored(run)
        trainable, _, _ = run.recipe.select(trajectories, 1)
    finally:
        close_run(run)
    solvers = [t for t in role(trajectories, "solver") if t.metadata[ROLE]["source"] == "proposed"]
    wrong = [t for t in solvers if normalize_answer(t.answer) != normalize_answer(t.metadata[ROLE]["answer"])]
    assert wrong and all(t.status == "reward_error" and t.reward is None and t not in trainable for t in wrong)
    assert all(t.reward == 1.0 for t in solvers if t not in wrong)  # exact matches never ask the judge
    run = scripted_run(tiny_model_dir, tmp_path / "raise", self_play={"n_solve": 2, "judge_failure": "raise", **judge})
    try:
        with pytest.raises(RuntimeError, match="judge_failure=raise"):
            collect_scored(run)
    finally:
        close_run(run)


def test_each_role_samples_and_is_scored_at_its_own_temperature(tiny_model_dir, tmp_path):
    from agentrl.trainer.update import sampling_options

    run = scripted_run(tiny_model_dir, tmp_path, self_play={"proposer_temperature": 0.7, "solver_temperature": 1.3})
    try:
        trajectories, _ = collect_scored(run)
        trainable, _, _ = run.recipe.select(trajectories, 1)
        parts, _ = run.recipe.loss_batches(trainable, 1)
    finally:
        close_run(run)
    temperatures = {}
    for name, temperature in run.engine.temperatures:
        temperatures.setdefault(name, set()).add(temperature)
    assert temperatures == {"proposer": {0.7}, "rag": {0.0}, "solver": {1.3}}
    # the update scores each role's batch under the distribution it was sampled from
    assert {p.name: sampling_options(run.config, p)["temperature"] for p in parts} == {"proposer": 0.7, "solver": 1.3}
    with pytest.warns(UserWarning, match="combine_update scores both roles in one batch"):
        close_run(scripted_run(tiny_model_dir, tmp_path / "combined", self_play={
            "proposer_temperature": 0.7, "solver_temperature": 1.3, "combine_update": True,
            "proposer_advantage": "grpo_batch"}))


def test_self_play_reads_no_training_question(tiny_model_dir, tmp_path):
    run = scripted_run(tiny_model_dir, tmp_path)
    close_run(run)
    assert run.train_rows == []
    config = ssp_config(tiny_model_dir, tmp_path / "bad")
    config["sft"]["data"] = None
    with pytest.raises(ValueError, match="sft.data"):
        build_run(build_config(config))
    assert "train.jsonl" not in (ROOT / "configs/ssp.yaml").read_text()


@pytest.mark.parametrize("max_draws", [0, 1])
def test_a_resumed_recipe_repeats_the_next_step_exactly_pool_included(tiny_model_dir, tmp_path, max_draws):
    def outcome(trajectories):
        return [(t.id, t.metadata[ROLE].get("question"), t.metadata[ROLE].get("source"), t.reward) for t in trajectories]

    options = {"n_solve": 2, "pool_clear_every": 5, "dynamic_sampling_max_draws": max_draws}
    straight = scripted_run(tiny_model_dir, tmp_path / "a", self_play=options, trainer={"prompts_per_step": 3})
    broken = scripted_run(tiny_model_dir, tmp_path / "b", self_play=options, trainer={"prompts_per_step": 3})
    try:
        for run in (straight, broken):
            for step in (1, 2):
                trajectories, _ = collect_scored(run, step)
                run.recipe.after_update([], step)
        state = json.loads(json.dumps(broken.recipe.state_dict()))  # what a checkpoint holds
        assert len(state["pool"]["problems"]) > 0 and (state["answer_position"] > 6) == (max_draws > 0)
        broken.recipe = SelfPlayRecipe(broken)
        broken.recipe.load_state_dict(state)
        expected, _ = collect_scored(straight, 3)
        resumed, _ = collect_scored(broken, 3)
    finally:
        close_run(straight), close_run(broken)
    assert outcome(resumed) == outcome(expected)
    if not max_draws:  # step 3 drew from the restored pool (with a further round its slots were all proposed)
        assert any(s == "pool" for _, _, s, _ in outcome(expected))
    assert broken.recipe.pool.state_dict() == straight.recipe.pool.state_dict()


def test_a_two_step_ssp_run_trains_end_to_end_with_the_tiny_model(tiny_model_dir, tmp_path):
    state = train(build_config(ssp_config(tiny_model_dir, tmp_path / "run")))
    assert state.step == 2
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and "sft/loss_last" in rows[0]
    for row in rows[1:]:
        assert "self_play/valid_rate" in row and "self_play/rejected/no_question" in row
        assert "self_play/pool_size" in row and row["proposer/trajectories"] == 3
    assert "eval/success_rate" in rows[2]
    recipe = torch.load(latest_checkpoint(tmp_path / "run") / "training.pt", weights_only=False)["extra"]["recipe"]
    assert recipe["answer_position"] == 6 and recipe["pool"]["problems"] == []  # the tiny model proposes nothing valid
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step-000002.jsonl").read_text().splitlines()]
    assert samples[0]["metadata"][ROLE]["role"] == "proposer" and "valid" in samples[0]["metadata"][ROLE]


@pytest.mark.slow
def test_sigkill_and_resume_of_self_play_gives_the_same_weights_and_metrics(tmp_path, tiny_model_dir):
    straight = ssp_config(tiny_model_dir, tmp_path / "straight",
                          trainer={"steps": 2, "eval_every": 0, "deterministic": True}, rollout={"max_batch_size": 1})
    killed_and_resumed(straight, tmp_path, kill_after_step=1, timeout=300)


def test_the_viewer_shows_each_proposal_with_its_question_rag_check_and_solver_attempts(tiny_model_dir, tmp_path):
    from agentrl.trajectory import write_jsonl
    from agentrl.viewer import write_viewer
    from tests.test_viewer import body_attributes, chromium

    run = scripted_run(tiny_model_dir, tmp_path, self_play={"n_solve": 2}, trainer={"prompts_per_step": 6})
    try:
        trajectories, _ = collect_scored(run)
    finally:
        close_run(run)
    write_jsonl(trajectories, tmp_path / "view" / "samples" / "step-000001.jsonl")
    page, count = write_viewer(tmp_path / "view", tokenizer=run.tokenizer)
    proposal = next(t for t in role(trajectories, "proposer") if t.metadata[ROLE]["valid"])
    dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()).stdout
    assert body_attributes(dom) == {"data-rendered": str(count), "data-shown": str(count)}  # no data-errors
    assert f"question: {proposal.metadata[ROLE]['question']}" in dom
    assert f"valid · RAG check answered {proposal.metadata[ROLE]['answer']}" in dom
    assert "solver attempt 2: " in dom and "rejected: too_short · no RAG check" in dom
    assert "solver attempt 1 (at a placeholder problem): none" in dom  # an invalid slot's attempts say what they solved
    assert "solver (proposed problem) · question: " in dom


def test_the_bench_reuses_a_warm_start_only_when_it_was_made_with_this_runs_settings(tmp_path):
    from agentrl.config import dump_config, load_config
    from bench.self_play import CONFIG, reuse_warm_start

    overrides = ["env.eval_size=16", "trainer.steps=0"]
    source = tmp_path / "warm"
    (source / "checkpoints" / "step-000000").mkdir(parents=True)
    (source / "checkpoints" / "step-000000" / "training.pt").write_bytes(b"state")
    (source / "metrics.jsonl").write_text('{"step": 0, "eval/success_rate": 0.25}\n')
    (source / "warm_start_s").write_text("812.5\n")
    made = load_config(ROOT / CONFIG, [*overrides, "trainer.torch_threads=2", f"output_dir={source}"])
    (source / "config.yaml").write_text(dump_config(made))  # other trainer settings: still the same warm start
    assert reuse_warm_start(source, tmp_path / "bench" / "warm", overrides) == 812.5
    assert (tmp_path / "bench" / "warm" / "checkpoints" / "step-000000" / "training.pt").read_bytes() == b"state"
    assert read_metrics(tmp_path / "bench" / "warm" / "metrics.jsonl")[0]["eval/success_rate"] == 0.25
    for changed in ("sft.epochs=3", "self_play.proposer_temperature=1.0", "env.eval_size=32"):
        other = load_config(ROOT / CONFIG, [*overrides, changed])
        (source / "config.yaml").write_text(dump_config(other))
        with pytest.raises(SystemExit, match=f"other {changed.split('.')[0]} settings"):
            reuse_warm_start(source, tmp_path / changed, overrides)
    for rl_only in ("self_play.pool_max_uses=2", "self_play.train_roles=[solver]",  # they act in RL steps only
                    "self_play.dynamic_sampling_max_draws=2"):
        (source / "config.yaml").write_text(dump_config(made))
        assert reuse_warm_start(source, tmp_path / rl_only, [*overrides, rl_only]) == 812.5
