"""The trainer's math fixes through the real trainer: the KL reference is the post-SFT policy, a
bf16 config changes its weights, the reward-path KL is k1, a non-finite step is skipped, dynamic
sampling refills the batch, minibatches are even, dropout is off."""

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from agentrl.config import ConfigError, build_config, load_config
from agentrl.models import (
    disable_dropout,
    fraction_of_weights_an_update_moves,
    prepare_master_weights,
)
from agentrl.tracking import read_metrics
from agentrl.trainer.local import (
    build_run,
    close_run,
    even_minibatches,
    reward_kl,
    train,
    train_step,
)
from agentrl.trainer.optim import clip_and_step
from tests.helpers.ping_env import write_demonstrations
from tests.test_trainer import ping_config

ROOT = Path(__file__).resolve().parent.parent


def tiny_run_config(tmp_path, model_dir, **sections):
    data = {
        "output_dir": str(tmp_path / "run"), "model": {"name": str(model_dir)},
        "env": {"name": "tests.helpers.ping_env:PingEnv", "eval_size": 2},
        "rollout": {"group_size": 3, "max_turns": 2, "max_new_tokens": 6, "max_response_tokens": 40},
        "trainer": {"steps": 1, "prompts_per_step": 2, "minibatch_size": 6, "micro_batch_size": 3, "lr": 1e-3,
                    "torch_threads": 1, "eval_before": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return build_config(data)


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


# -- D3: the KL reference is the policy RL starts from ----------------------------------------------


def test_the_kl_reference_is_the_post_sft_policy(tmp_path, tiny_model_dir):
    demonstrations = write_demonstrations(tmp_path / "demos.jsonl")
    config = ping_config(tiny_model_dir, tmp_path / "run", demonstrations, algo={"advantage": "grpo", "kl_coef": 0.1},
                         trainer={"steps": 1, "prompts_per_step": 2, "minibatch_size": 8, "micro_batch_size": 4,
                                  "lr": 1e-3, "eval_every": 0, "eval_before": False, "torch_threads": 1, "seed": 0,
                                  "save_every": 1, "keep_checkpoints": 5},
                         sft={"enabled": True, "data": str(demonstrations), "epochs": 2, "lr": 1e-2, "batch_size": 8})
    train(build_config(config))
    output = tmp_path / "run"
    reference = weights(output / "reference")
    post_sft = weights(output / "checkpoints" / "step-000000" / "model")
    initial = weights(Path(tiny_model_dir))
    assert reference.keys() == post_sft.keys()
    assert all(torch.equal(reference[name], post_sft[name]) for name in reference)
    assert any(not torch.equal(reference[name], initial[name]) for name in reference)  # SFT did change them


def test_a_resumed_run_rebuilds_the_post_sft_reference(tmp_path, tiny_model_dir):
    from agentrl.trainer.local import load_reference

    demonstrations = write_demonstrations(tmp_path / "demos.jsonl")
    config = ping_config(tiny_model_dir, tmp_path / "run", demonstrations, algo={"advantage": "grpo", "kl_coef": 0.1},
                         trainer={"steps": 0, "eval_before": False, "torch_threads": 1},
                         sft={"enabled": True, "data": str(demonstrations), "epochs": 1, "lr": 1e-2, "batch_size": 8})
    train(build_config(config))
    run = build_run(build_config(config))
    try:
        reference = load_reference(run)
        saved = weights(tmp_path / "run" / "reference")
        for name, parameter in reference.named_parameters():
            if name in saved:
                assert torch.equal(parameter, saved[name])
        assert not any(p.requires_grad for p in reference.parameters())
    finally:
        close_run(run)


# -- D4: bf16 training keeps fp32 master weights ----------------------------------------------------


def test_search_r1_keeps_fp32_weights_and_computes_in_bf16():
    config = load_config(ROOT / "configs" / "search_r1.yaml")
    assert config.model.dtype == "float32" and config.trainer.precision == "bf16"


def test_a_bf16_config_actually_changes_its_weights(tmp_path, tiny_model_dir):
    search_r1 = yaml.safe_load((ROOT / "configs" / "search_r1.yaml").read_text())
    config = tiny_run_config(tmp_path, tiny_model_dir, model={"dtype": "bfloat16"},
                             trainer={"lr": search_r1["trainer"]["lr"], "precision": "bf16"},
                             algo={"kl_coef": search_r1["algo"]["kl_coef"]})
    run = build_run(config)
    reward = run.env.reward
    run.env.reward = lambda task, trajectory: reward(task, trajectory).__class__((sum(trajectory.response_ids) % 7) / 7)
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    before = [p.detach().clone() for p in run.model.parameters()]
    try:
        metrics, _ = train_step(run)
    finally:
        close_run(run)
    assert "update/skipped" not in metrics
    changed = sum(int((a != b).sum()) for a, b in zip(before, run.model.parameters()))
    total = sum(p.numel() for p in before)
    assert changed / total > 0.5, changed / total


def test_bf16_weights_with_a_learning_rate_they_cannot_represent_are_refused(tmp_path, tiny_model_dir):
    config = tiny_run_config(tmp_path, tiny_model_dir, model={"dtype": "bfloat16"}, trainer={"lr": 1e-6})
    with pytest.raises(ConfigError, match="model.dtype=float32 and trainer.precision=bf16"):
        build_run(config)


def test_the_fraction_of_weights_a_step_moves():
    weights_002 = torch.full((1000,), 0.02)
    assert fraction_of_weights_an_update_moves([weights_002], 1e-6) == 1.0
    assert fraction_of_weights_an_update_moves([weights_002.bfloat16()], 1e-6) == 0.0
    assert fraction_of_weights_an_update_moves([weights_002.bfloat16()], 1e-4) == 1.0  # spacing 1.2e-4


def test_bf16_precision_upcasts_trainable_low_precision_weights():
    model = torch.nn.Linear(4, 4).bfloat16()
    assert prepare_master_weights(model, "bf16", 1e-6) is not None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert prepare_master_weights(model, "fp32", 1e-6) is None  # already fp32: nothing to do


# -- D2: the KL in the reward is k1 -----------------------------------------------------------------


def test_the_reward_path_kl_defaults_to_k1_and_the_loss_path_to_low_var_kl():
    algo = build_config({"algo": {"advantage": "reinforce_pp", "kl_coef": 0.1}}).algo
    old, reference, mask = torch.tensor([[-1.0, -0.5]]), torch.tensor([[-2.0, -0.5]]), torch.ones(1, 2)
    # k1 = log pi_old - log pi_ref = [1, 0]; k3 would give exp(-1) + 1 - 1 = 0.368
    assert reward_kl(old, reference, mask, algo).tolist() == [[1.0, 0.0]]
    grpo = build_config({"algo": {"kl_coef": 0.1}}).algo
    assert reward_kl(old, reference, mask, grpo) is None and grpo.kl_loss_type == "low_var_kl"


def test_k1_as_a_loss_warns_and_the_old_key_still_works():
    with pytest.warns(UserWarning, match="zero expected gradient"):
        build_config({"algo": {"kl_coef": 0.1, "kl_loss_type": "k1"}})
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert build_config({"algo": {"kl_type": "k3"}}).algo.kl_loss_type == "k3"


# -- Q3: a non-finite gradient skips the step -------------------------------------------------------


def test_a_step_with_a_non_finite_grad_norm_is_skipped():
    layer = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in layer.parameters()]
    (layer(torch.ones(1, 3)) * float("nan")).sum().backward()
    grad_norm, stepped = clip_and_step(optimizer, list(layer.parameters()), 1.0)
    assert not stepped and math.isnan(grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters())) and not optimizer.state
    assert all(p.grad is None for p in layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    _, stepped = clip_and_step(optimizer, list(layer.parameters()), 1.0)
    assert stepped and not torch.equal(before[0], layer.weight)


def test_the_trainer_counts_skipped_non_finite_steps(tmp_path, tiny_model_dir):
    run = build_run(tiny_run_config(tmp_path, tiny_model_dir))
    reward = run.env.reward
    run.env.reward = lambda task, trajectory: reward(task, trajectory).__class__((sum(trajectory.response_ids) % 7) / 7)
    hook = run.model.get_input_embeddings().weight.register_hook(lambda grad: grad * float("nan"))
    before = [p.detach().clone() for p in run.model.parameters()]
    try:
        metrics, _ = train_step(run)
    finally:
        hook.remove()
        close_run(run)
    assert metrics["update/nonfinite_skipped"] == 1.0 and "grad_norm" not in metrics
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))


def test_a_step_with_a_zero_gradient_leaves_the_weights_and_adams_moments_alone():
    layer = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.01)
    layer(torch.ones(1, 3)).sum().backward()
    assert clip_and_step(optimizer, list(layer.parameters()), 1.0)[1]
    before = [p.detach().clone() for p in layer.parameters()]
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in layer.parameters()}
    optimizer.zero_grad(set_to_none=True)
    (layer(torch.ones(1, 3)) * 0.0).sum().backward()  # every advantage zero: gradients exist and are all 0
    grad_norm, stepped = clip_and_step(optimizer, list(layer.parameters()), 1.0)
    assert grad_norm == 0.0 and not stepped
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert all(torch.equal(v, moments[id(p)][k]) for p in layer.parameters() for k, v in optimizer.state[p].items())


def test_a_batch_with_no_learning_signal_after_a_real_step_changes_no_weight(tmp_path, tiny_model_dir):
    """Adam's momentum from the first step would move every weight again on a batch whose rewards
    are all equal (GRPO advantages all zero), as on a self-play step whose proposals are all invalid."""
    run = build_run(tiny_run_config(tmp_path, tiny_model_dir))
    reward = run.env.reward
    try:
        run.env.reward = lambda task, trajectory: reward(task, trajectory).__class__((sum(trajectory.response_ids) % 7) / 7)
        first, _ = train_step(run)
        assert "update/skipped" not in first and first["grad_norm"] > 0
        before = [p.detach().clone() for p in run.model.parameters()]
        version = run.engine.policy_version
        run.env.reward = lambda task, trajectory: reward(task, trajectory).__class__(0.5)
        second, _ = train_step(run)
    finally:
        close_run(run)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    assert second["update/zero_grad_skipped"] == 1.0 and second["update/skipped"] == 1.0
    assert "grad_norm" not in second and second["update/nonfinite_skipped"] == 0.0
    assert run.engine.policy_version == version  # no weights sent for an update that changed nothing


def test_a_resumed_run_trains_at_the_learning_rate_its_config_gives(tmp_path, tiny_model_dir):
    """The optimizer's and the scheduler's saved states carry the old rate; the config is the record."""
    first = tiny_run_config(tmp_path, tiny_model_dir, trainer={"steps": 1, "lr": 1e-3, "schedule": "linear"})
    train(first)
    resumed = first.model_copy(update={"resume": True, "trainer": first.trainer.model_copy(
        update={"steps": 2, "lr": 4e-4, "weight_decay": 0.01})})
    with pytest.warns(UserWarning, match=r"lr: 0.001 -> 0.0004.*weight_decay: 0.0 -> 0.01"):
        train(resumed)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    # the rate each step trained at: step 2 at the new base rate, halfway down the 2-step linear schedule
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[1]["lr"] == pytest.approx(0.5 * 4e-4)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["trainer"]["lr"] == 4e-4


# -- Q6: dynamic sampling refills the batch ---------------------------------------------------------


def test_dynamic_sampling_refills_the_batch_with_bounded_extra_draws(tmp_path, tiny_model_dir):
    config = tiny_run_config(tmp_path, tiny_model_dir, algo={"dynamic_sampling": True, "dynamic_sampling_max_draws": 6})
    run = build_run(config)
    reward = run.env.reward

    def half_tied(task, trajectory):  # groups of rows with an even index all score 1: no signal
        row = int(task.id.split("@")[0].split("-")[1])
        value = 1.0 if row % 2 == 0 else (sum(trajectory.response_ids) % 7) / 7
        return reward(task, trajectory).__class__(value)

    run.env.reward = half_tied
    try:
        metrics, trajectories = train_step(run)
    finally:
        close_run(run)
    assert metrics["filter/groups"] == 2.0 and metrics["update/trajectories"] == 6.0
    assert 1 <= metrics["filter/extra_draws"] <= 6
    assert len(trajectories) == 6 + 6 * int(metrics["filter/extra_draws"])


@pytest.mark.parametrize("estimator", ["gae", "reinforce"])
def test_dynamic_sampling_is_refused_for_estimators_without_a_group_baseline(estimator):
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        build_config({"algo": {"advantage": estimator, "dynamic_sampling": True}})


# -- Q10, Q11 ---------------------------------------------------------------------------------------


def test_minibatches_are_near_equal_instead_of_a_ragged_remainder():
    sizes = [len(chunk) for chunk in even_minibatches(torch.arange(40), 32)]
    assert sizes == [20, 20]
    assert [len(chunk) for chunk in even_minibatches(torch.arange(8), 8)] == [8]


def test_dropout_is_disabled_for_rl(tokenizer):
    from peft import LoraConfig, get_peft_model

    from agentrl.models import tiny_model

    model = tiny_model(tokenizer)
    model.config.attention_dropout = 0.1
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.3, target_modules=["q_proj"]))
    assert disable_dropout(model) > 0
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in model.modules())


# -- the ArCHer critic resumes exactly --------------------------------------------------------------


def test_an_archer_run_resumed_from_its_checkpoint_matches_an_unbroken_one(tmp_path, tiny_model_dir):
    from agentrl.trainer.checkpoint import latest_checkpoint, load_checkpoint

    def config(name, steps, resume=False):
        data = tiny_run_config(tmp_path / name, tiny_model_dir, algo={
            "advantage": "archer", "archer": {"warmup_steps": 1, "updates_per_step": 3, "hidden_size": 8}},
            trainer={"steps": steps, "save_every": 1}).model_dump()
        data["output_dir"], data["resume"] = str(tmp_path / name), resume
        data["tracking"] = {"progress": False, "plot": False, "sample_trajectories": 0}
        return build_config(data)

    train(config("unbroken", 2))
    train(config("resumed", 1))
    train(config("resumed", 2, resume=True))
    states = []
    for name in ("unbroken", "resumed"):
        extra: dict = {}
        from agentrl.models import load_model

        model, _ = load_model(str(tiny_model_dir))
        load_checkpoint(latest_checkpoint(tmp_path / name), model, extra=extra)
        states.append((model, extra["critic"]))
    (model_a, critic_a), (model_b, critic_b) = states
    assert critic_a["updates"] == critic_b["updates"] == 6 and critic_a["collections"] == 2
    for key in ("critic", "target"):
        assert all(torch.equal(critic_a[key][name], critic_b[key][name]) for name in critic_a[key])
    assert all(torch.equal(critic_a["buffer"][k], critic_b["buffer"][k]) for k in critic_a["buffer"])
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_with_lora_the_kl_reference_keeps_the_sft_adapters(tmp_path, tiny_model_dir):
    from agentrl.trainer.local import load_reference

    demonstrations = write_demonstrations(tmp_path / "demos.jsonl")
    config = ping_config(tiny_model_dir, tmp_path / "run", demonstrations, algo={"advantage": "grpo", "kl_coef": 0.1},
                         model={"name": str(tiny_model_dir),
                                "lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}},
                         trainer={"steps": 0, "eval_before": False, "torch_threads": 1},
                         sft={"enabled": True, "data": str(demonstrations), "epochs": 2, "lr": 1e-2, "batch_size": 8})
    train(build_config(config))
    adapters = weights(tmp_path / "run" / "reference")
    final = weights(tmp_path / "run" / "model")  # 0 RL steps: the final model is the SFT model
    lora_b = [name for name in adapters if "lora_B" in name]
    assert lora_b and all(adapters[name].abs().sum() > 0 for name in lora_b)  # SFT trained them (B starts at 0)
    assert all(torch.equal(adapters[name], final[name]) for name in adapters)
    run = build_run(build_config(config))
    try:
        reference = load_reference(run)
        loaded = {n: p for n, p in reference.named_parameters() if "lora_B" in n}
        assert loaded and all(p.abs().sum() > 0 for p in loaded.values())
    finally:
        close_run(run)


def test_a_separately_clipped_group_has_its_own_norm_budget():
    policy, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([policy, head], lr=1.0)
    policy.grad, head.grad = torch.tensor([0.6, 0.8]), torch.tensor([30.0, 40.0])  # norms 1 and 50
    grad_norm, stepped = clip_and_step(optimizer, [policy], 1.0, [head])
    assert stepped and grad_norm == pytest.approx(1.0)
    # jointly clipped, the head's norm 50 would have shrunk the policy's step to 1/50
    assert torch.allclose(policy, torch.tensor([-0.6, -0.8])) and torch.allclose(head, torch.tensor([-0.6, -0.8]))


# -- Q8: Clip-Cov / KL-Cov choose their tokens over the minibatch --------------------------------


@pytest.mark.parametrize("option", [{"kl_cov_ratio": 0.2}, {"clip_cov_ratio": 0.2, "clip_cov_lower": -10.0, "clip_cov_upper": 10.0}])
def test_the_covariance_token_choice_does_not_depend_on_the_micro_batch_size(tmp_path, tiny_model_dir, option):
    from agentrl.trainer.batching import collate
    from agentrl.trainer.local import minibatch_covariance_selection

    run = build_run(tiny_run_config(tmp_path, tiny_model_dir, algo=option))
    try:
        from agentrl.trainer.local import next_tasks

        rollout = run.loop.run_until_complete(run.worker.run_batch(next_tasks(run), seed=1))
        batch = collate(rollout.trajectories, run.tokenizer.pad_token_id)
        advantages = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(0)) * batch.loss_mask
        choices = []
        for micro in (1, 2, 6):
            run.config.trainer.micro_batch_size = micro
            generator = torch.Generator().manual_seed(5)
            choices.append(minibatch_covariance_selection(run, batch, torch.arange(batch.size), None, advantages, generator))
    finally:
        close_run(run)
    budget = max(int(0.2 * int(batch.loss_mask.sum())), 1)
    assert int(choices[0].sum()) == budget  # one budget for the whole minibatch, not one per micro-batch
    assert all(torch.equal(choices[0], other) for other in choices[1:])
