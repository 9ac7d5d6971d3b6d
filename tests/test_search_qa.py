"""Search QA: SQuAD-normalised EM and F1, the Search-R1 prompt, and the loaders."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from agentrl.envs.search_qa import (
    SEARCH_R1_PROMPT,
    SearchQAEnv,
    exact_match,
    f1_score,
    normalize_answer,
)

from agentrl.trajectory import Trajectory


@pytest.mark.parametrize(
    "text, normalized",
    [("The Eiffel Tower!", "eiffel tower"), ("  an   apple ", "apple"), ("A.B.C.", "abc"), ("Théâtre", "théâtre"),
     ("the the", ""), ("Paris, France", "paris france")],
)
def test_squad_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1():
    assert exact_match("the Eiffel tower", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert f1_score("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert f1_score("tower in Paris", ["Eiffel Tower", "Paris tower"]) == pytest.approx(0.8)
    assert f1_score("London", ["Paris"]) == 0.0


def test_prompt_is_the_search_r1_instruction():
    env = SearchQAEnv()
    task = env.make_task({"id": "q1", "question": "who wrote hamlet", "golden_answers": ["Shakespeare"]}, 0)
    assert task.messages == [{"role": "user", "content": SEARCH_R1_PROMPT.format(question="who wrote hamlet?")}]
    assert "<search> query </search>" in task.messages[0]["content"] and task.answer == ["Shakespeare"]


def test_reward_needs_a_well_formed_answer():
    env = SearchQAEnv()
    task = env.make_task({"question": "q", "golden_answers": ["Velmor", "V. Quazz"]}, 0)
    trajectory = Trajectory(id="t", group_id="g", prompt_ids=[1])
    assert env.reward(task, trajectory).score == 0.0
    trajectory.answer = "velmor."
    reward = env.reward(task, trajectory)
    assert reward.score == 1.0 and reward.success and reward.info["f1"] == 1.0


def test_bundled_fictional_data_loads_with_disjoint_people():
    env = SearchQAEnv()
    train, evaluation = env.load("train"), env.load("eval")
    assert len(train) > 2000 and len(evaluation) > 200
    assert not {r["entity"] for r in train} & {r["entity"] for r in evaluation}
    assert {r["hops"] for r in evaluation} == {1, 2, 3}
    assert all(r["hops"] == 1 for r in SearchQAEnv(hops=1).load("eval"))


def test_flashrag_directory_and_parquet(tmp_path):
    rows = [{"id": "1", "question": "q1", "golden_answers": ["a"]}, {"id": "2", "question": "q2", "golden_answers": ["b"]}]
    (tmp_path / "nq").mkdir()
    (tmp_path / "nq" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "nq" / "train.parquet")
    env = SearchQAEnv(dataset="nq")
    assert env.load("eval", str(tmp_path)) == rows
    assert env.load("train", str(tmp_path)) == rows
    with pytest.raises(ValueError, match="env.options.dataset"):
        SearchQAEnv().load("eval", str(tmp_path))
