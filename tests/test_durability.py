"""Durability: the final model is replaced atomically, and a JSONL file whose writer was killed
mid-line is still readable (the torn last line is skipped with a warning)."""

import json

import pytest
import torch

from agentrl.tracking import read_metrics
from agentrl.trainer.checkpoint import save_final_model
from agentrl.trajectory import Trajectory, read_jsonl, write_jsonl


def weights(model) -> torch.Tensor:
    return next(model.parameters()).detach().clone()


def test_the_final_model_is_replaced_atomically(tmp_path, tiny_model, tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = save_final_model(tiny_model, tokenizer, tmp_path)
    assert first == tmp_path / "model"
    saved = weights(tiny_model)
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)

    real_save = type(tiny_model).save_pretrained

    def killed_midway(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        for item in list(__import__("pathlib").Path(directory).iterdir())[:1]:
            item.write_bytes(b"torn")  # half a file on disk, then the process dies
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(type(tiny_model), "save_pretrained", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_final_model(tiny_model, tokenizer, tmp_path)
    monkeypatch.undo()
    # the previous final model is untouched and loads
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert torch.equal(weights(reloaded), saved)
    AutoTokenizer.from_pretrained(tmp_path / "model")
    # the next save replaces it and leaves no staging directory behind
    save_final_model(tiny_model, tokenizer, tmp_path)
    assert torch.equal(weights(AutoModelForCausalLM.from_pretrained(tmp_path / "model")), weights(tiny_model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def trajectories(n):
    return [Trajectory(id=f"t{i}", group_id="g", prompt_ids=[1, 2, i]) for i in range(n)]


def test_a_torn_last_trajectory_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    write_jsonl(trajectories(3), path)
    whole = path.read_text()
    path.write_text(whole[: len(whole) - 25])  # the writer died inside the last line
    with pytest.warns(UserWarning, match="torn last line"):
        read = list(read_jsonl(path))
    assert [t.id for t in read] == ["t0", "t1"]


def test_a_malformed_line_in_the_middle_is_still_an_error(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    lines = [t.to_json() for t in trajectories(3)]
    lines[1] = lines[1][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=":2: not a trajectory"):
        list(read_jsonl(path))


def test_a_torn_last_metrics_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n" + '{"step": 2, "rew')
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_metrics(path) == [{"step": 1, "reward_mean": 0.5}]
