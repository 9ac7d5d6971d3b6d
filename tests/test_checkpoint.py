"""Checkpoints restore exactly, keep only the newest N, and survive SIGKILL at any moment."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from agentrl.trainer.checkpoint import (
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def _train_one_step(model, optimizer, scheduler):
    loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _parts(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


def test_checkpoint_restores_weights_optimizer_scheduler_rng_and_state(tmp_path, tokenizer):
    from agentrl.models import tiny_model

    model = tiny_model(tokenizer, hidden_size=32, num_layers=1)
    optimizer, scheduler = _parts(model)
    _train_one_step(model, optimizer, scheduler)
    head = torch.nn.Linear(32, 1)
    state = TrainerState(step=1, data_position=8, policy_version=1, metrics=[{"step": 1, "reward_mean": 0.5}])
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    save_checkpoint(tmp_path, state, model, optimizer, scheduler, head, partial_rollouts={"carry": [1, 2]})
    expected_random = (random.random(), np.random.rand(), torch.rand(1))
    _train_one_step(model, optimizer, scheduler)
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = tiny_model(tokenizer, seed=9, hidden_size=32, num_layers=1)
    fresh_optimizer, fresh_scheduler = _parts(fresh)
    fresh_head = torch.nn.Linear(32, 1)
    restored, partial = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_optimizer, fresh_scheduler, fresh_head)
    assert restored == state and partial == {"carry": [1, 2]}
    assert torch.equal(fresh_head.weight, head.weight)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_random
    assert fresh_scheduler.last_epoch == 1
    _train_one_step(fresh, fresh_optimizer, fresh_scheduler)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected_weights[key]), key


class RunsCode:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_checkpoint_holding_an_arbitrary_object_is_refused_and_runs_nothing(tmp_path, tokenizer):
    from agentrl.models import tiny_model
    from agentrl.trainer.checkpoint import UnsafeCheckpoint

    model = tiny_model(tokenizer, hidden_size=32, num_layers=1)
    path = save_checkpoint(tmp_path, TrainerState(step=1), model)
    training = torch.load(path / "training.pt", weights_only=True)
    marker = tmp_path / "marker"
    training["extra"] = {"recipe": {"buffer": RunsCode(marker)}}
    torch.save(training, path / "training.pt")  # a tampered checkpoint
    fresh = tiny_model(tokenizer, seed=9, hidden_size=32, num_layers=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(UnsafeCheckpoint, match="exec"):
        load_checkpoint(path, fresh, extra={})
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # nothing was loaded
    torch.load(path / "training.pt", weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.read_text() == "ran"


def test_extra_state_round_trips_as_plain_data_and_arrays_are_refused_at_save(tmp_path, tokenizer):
    from agentrl.models import tiny_model

    model = tiny_model(tokenizer, hidden_size=32, num_layers=1)
    rng = np.random.default_rng(5)
    rng.random(3)
    extra = {"critic": {"head": torch.ones(2), "updates": 3},
             "recipe": {"buffer": {"entries": [{"reward": np.float64(0.5), "mask": [1, 0], "step": np.int64(2)}],
                                   "rng": rng.bit_generator.state, "replays": 1}}}
    save_checkpoint(tmp_path, TrainerState(step=1), model, extra=extra,
                    partial_rollouts={"groups": [{"task": {"id": "t", "images": []}, "runs": []}]})
    expected = rng.random(4)
    restored: dict = {}
    _, partial = load_checkpoint(latest_checkpoint(tmp_path), model, extra=restored)
    assert partial == {"groups": [{"task": {"id": "t", "images": []}, "runs": []}]}
    entry = restored["recipe"]["buffer"]["entries"][0]
    assert entry == {"reward": 0.5, "mask": [1, 0], "step": 2} and type(entry["step"]) is int
    assert torch.equal(restored["critic"]["head"], torch.ones(2))
    again = np.random.default_rng()
    again.bit_generator.state = restored["recipe"]["buffer"]["rng"]  # PCG64's 128-bit ints survive
    assert np.array_equal(again.random(4), expected)
    with pytest.raises(TypeError, match=r"training\['extra'\]\['recipe'\]\['x'\] is a numpy.ndarray"):
        save_checkpoint(tmp_path, TrainerState(step=2), model, extra={"recipe": {"x": np.zeros(2)}})
    assert latest_checkpoint(tmp_path).name == "step-000001"


def test_lora_checkpoints_hold_only_the_adapters(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    from agentrl.models import tiny_model

    def lora_model(seed):
        return get_peft_model(tiny_model(tokenizer, seed=seed, hidden_size=32, num_layers=1),
                              LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    torch.manual_seed(0)
    model = lora_model(0)
    path = save_checkpoint(tmp_path, TrainerState(step=1), model)
    assert (path / "model" / "adapter_model.safetensors").is_file()
    assert not list((path / "model").glob("model*.safetensors"))
    torch.manual_seed(1)
    other = lora_model(0)
    load_checkpoint(path, other)
    for (name, value), (_, expected) in zip(other.named_parameters(), model.named_parameters()):
        assert torch.equal(value, expected), name


def test_only_the_newest_checkpoints_are_kept(tmp_path, tokenizer):
    from agentrl.models import tiny_model

    model = tiny_model(tokenizer, hidden_size=32, num_layers=1)
    for step in range(1, 5):
        save_checkpoint(tmp_path, TrainerState(step=step), model, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert latest_checkpoint(tmp_path).name == "step-000004"


def test_half_written_checkpoints_are_ignored(tmp_path, tokenizer):
    from agentrl.models import tiny_model

    model = tiny_model(tokenizer, hidden_size=32, num_layers=1)
    save_checkpoint(tmp_path, TrainerState(step=1), model)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000002-abc").mkdir()  # a save killed before its rename
    (root / "step-000003").mkdir()  # no state.json: never completed
    assert latest_checkpoint(tmp_path).name == "step-000001"
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step-000001"
    save_checkpoint(tmp_path, TrainerState(step=2), model)
    assert not list(root.glob(".tmp-*"))


SAVER = textwrap.dedent("""
    import sys, torch
    from agentrl.models import load_tokenizer, tiny_model
    from agentrl.trainer.checkpoint import TrainerState, save_checkpoint
    model = tiny_model(load_tokenizer("smollm2-135m-instruct"), hidden_size=32, num_layers=1)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.model.norm.weight.fill_(float(step))
        save_checkpoint(sys.argv[1], TrainerState(step=step), model, keep=2)
        print(step, flush=True)
""")


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7])
def test_sigkill_during_saves_leaves_a_complete_latest_checkpoint(tmp_path, tokenizer, delay):
    from agentrl.models import tiny_model

    process = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "1"  # at least one save finished
    time.sleep(delay)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    path = latest_checkpoint(tmp_path)
    model = tiny_model(tokenizer, hidden_size=32, num_layers=1)
    state, _ = load_checkpoint(path, model)
    assert state.step >= 1 and path.name == f"step-{state.step:06d}"
    assert torch.all(model.model.norm.weight == float(state.step))
