"""The trajectory model: masks follow who produced each token, and JSONL round-trips losslessly."""

import math

import pytest

from agentrl.trajectory import ToolCallRecord, Trajectory, read_jsonl, write_jsonl


def make_trajectory() -> Trajectory:
    trajectory = Trajectory(id="t0", group_id="g0", prompt_ids=[1, 2, 3], policy_version=5)
    trajectory.append_model_tokens([10, 11, 12], [-0.5, -1.25, -1e-9], turn=0, policy_version=5)
    trajectory.append_observation_tokens([20, 21], turn=0)
    trajectory.append_observation_tokens([22], turn=0, role="template")
    trajectory.append_model_tokens([13], [-0.1], turn=1, policy_version=6)
    trajectory.tool_calls.append(
        ToolCallRecord(tool="search", arguments={"query": "Velmor ünïcode"}, turn=0, latency_s=0.125)
    )
    trajectory.stop_reason = "answer"
    trajectory.reward = 1.0
    trajectory.turn_rewards = [0.0, 1.0]
    trajectory.answer = "Paris"
    trajectory.metrics = {"f1": 0.5}
    trajectory.metadata = {"nested": {"images": ["a.png"]}}
    return trajectory


def test_loss_mask_marks_model_tokens_only():
    trajectory = make_trajectory()
    assert trajectory.loss_mask == [1, 1, 1, 0, 0, 0, 1]
    assert trajectory.logprobs[3:6] == [0.0, 0.0, 0.0]
    assert [s.role for s in trajectory.turns] == ["assistant", "observation", "template", "assistant"]
    assert [s.policy_version for s in trajectory.turns] == [5, None, None, 6]
    assert trajectory.num_turns == 2 and trajectory.num_model_tokens == 4
    trajectory.validate()


def test_spans_merge_only_when_contiguous_and_same_version():
    trajectory = Trajectory(id="t", group_id="g", prompt_ids=[0])
    trajectory.append_model_tokens([1], [-0.1], turn=0, policy_version=1)
    trajectory.append_model_tokens([2], [-0.2], turn=0, policy_version=1)
    trajectory.append_model_tokens([3], [-0.3], turn=0, policy_version=2)
    assert [(s.start, s.end, s.policy_version) for s in trajectory.turns] == [(0, 2, 1), (2, 3, 2)]


def test_jsonl_round_trip_is_lossless(tmp_path):
    trajectories = [make_trajectory(), Trajectory(id="t1", group_id="g0", prompt_ids=[], status="infra_error")]
    trajectories[1].reward = math.nan
    path = tmp_path / "run" / "trajectories.jsonl"
    assert write_jsonl(trajectories, path) == 2
    loaded = list(read_jsonl(path))
    assert loaded[0] == trajectories[0]
    assert loaded[0].logprobs[2] == -1e-9  # floats survive exactly
    assert math.isnan(loaded[1].reward) and loaded[1].status == "infra_error"
    assert not loaded[1].trainable and loaded[0].trainable


def test_validate_catches_inconsistent_arrays():
    trajectory = make_trajectory()
    trajectory.loss_mask.pop()
    with pytest.raises(ValueError, match="loss_mask"):
        trajectory.validate()


def test_validate_catches_mask_disagreeing_with_span_role():
    trajectory = make_trajectory()
    trajectory.loss_mask[3] = 1
    with pytest.raises(ValueError, match="loss mask"):
        trajectory.validate()


def test_mismatched_logprobs_are_refused():
    trajectory = Trajectory(id="t", group_id="g", prompt_ids=[])
    with pytest.raises(ValueError, match="logprobs"):
        trajectory.append_model_tokens([1, 2], [-0.1], turn=0, policy_version=0)


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(make_trajectory().to_json() + "\n" + '{"id": "x", "bogus": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(read_jsonl(path))
