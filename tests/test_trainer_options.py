"""Every estimator and loss option runs through a real trainer step (rollout, old and reference
logprobs, advantages, update) with finite metrics and a policy that actually changes."""

import math

import pytest
import torch

from agentrl.config import build_config
from agentrl.trainer.local import build_run, close_run, lr_lambda, train_step

OPTIONS = {
    "grpo_dual_clip": {"algo": {"advantage": "grpo", "dual_clip": 3.0}},
    "dr_grpo": {"algo": {"advantage": "dr_grpo", "loss_agg": "dr-grpo"}},
    "rloo_seq_mean": {"algo": {"advantage": "rloo", "loss_agg": "seq-mean-token-mean"}},
    "reinforce_pp_kl_in_reward": {"algo": {"advantage": "reinforce_pp", "kl_coef": 0.1}},
    "grpo_kl_in_reward_k2_loss": {"algo": {"advantage": "grpo", "kl_coef": 0.1, "kl_in_reward": True}},
    "grpo_k2_loss": {"algo": {"kl_coef": 0.1, "kl_loss_type": "k2"}},
    "gae_unwhitened_detached_trunk": {"algo": {"advantage": "gae", "whiten_gae": False, "value_trunk_grad": False,
                                               "value_coef": 0.5}},
    "gigpo": {"algo": {"advantage": "gigpo", "gigpo": {"step_weight": 0.5, "gamma": 0.9}}},
    "gigpo_kl_in_reward": {"algo": {"advantage": "gigpo", "kl_coef": 0.1, "kl_in_reward": True}},
    "archer": {"algo": {"advantage": "archer", "archer": {"warmup_steps": 0, "updates_per_step": 4, "hidden_size": 16}}},
    "is_all_tokens": {"algo": {"is_all_tokens": True}, "trainer": {"minibatch_size": 2}},
    "tempered_top_p": {"rollout": {"temperature": 0.8, "top_p": 0.9}, "trainer": {"epochs": 2}},
    "reinforce_pp_baseline": {"algo": {"advantage": "reinforce_pp_baseline", "loss_agg": "seq-mean-token-sum"}},
    "gae_value_head": {"algo": {"advantage": "gae", "gamma": 0.99, "lam": 0.95}},
    "turn_grpo": {"algo": {"advantage": "turn_grpo", "turn_gamma": 0.9}},
    "clip_cov": {"algo": {"clip_cov_ratio": 0.2, "clip_cov_lower": -10.0, "clip_cov_upper": 10.0}},
    "kl_cov_entropy": {"algo": {"kl_cov_ratio": 0.2, "entropy_coef": 0.01}},
    "lora_kl_to_base": {"model": {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}},
                        "algo": {"kl_coef": 0.1}},
    "full_kl_to_copy_bf16_checkpointing": {"algo": {"kl_coef": 0.1}, "trainer": {"precision": "bf16"},
                                           "model": {"gradient_checkpointing": True}},
    "dynamic_sampling_overlong": {"algo": {"dynamic_sampling": True, "overlong_filter": True}},
}


def rewarded(trajectory) -> float:
    """A reward that varies within (almost) every group: a hash of the sampled tokens."""
    return (sum(trajectory.response_ids) % 7) / 7


@pytest.mark.parametrize("name", list(OPTIONS))
def test_one_step_with_each_option(name, tmp_path, tiny_model_dir):
    data = {
        "output_dir": str(tmp_path), "model": {"name": str(tiny_model_dir)},
        "env": {"name": "tests.helpers.ping_env:PingEnv", "eval_size": 2},
        "rollout": {"group_size": 3, "max_turns": 2, "max_new_tokens": 6, "max_response_tokens": 24},
        "trainer": {"steps": 2, "prompts_per_step": 2, "minibatch_size": 3, "micro_batch_size": 2, "lr": 1e-3,
                    "torch_threads": 1},
    }
    for section, values in OPTIONS[name].items():
        data.setdefault(section, {}).update(values)
    run = build_run(build_config(data))
    reward = run.env.reward
    run.env.reward = lambda task, trajectory: reward(task, trajectory).__class__(rewarded(trajectory))
    before = [p.detach().clone() for p in run.model.parameters() if p.requires_grad]
    try:
        metrics, trajectories = train_step(run)
    finally:
        close_run(run)
    assert len(trajectories) >= 6 and run.engine.policy_version == (0 if "update/skipped" in metrics else 1)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    if "update/skipped" not in metrics:
        assert metrics["grad_norm"] > 0
        after = [p for p in run.model.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))
    if name == "gae_value_head":
        assert "loss/value" in metrics and run.value_head.weight.abs().sum() > 0
    if name == "archer":
        assert metrics["critic/buffer"] > 0 and run.critic.updates == 4
    if name == "tempered_top_p":  # pi_old is scored at the sampling temperature and top-p: it equals mu
        assert metrics["rollout/logprob_mismatch"] < 1e-3
    if name.startswith("lora"):
        assert metrics["loss/kl"] >= 0 and all("lora" in n for n, p in run.model.named_parameters() if p.requires_grad)


def test_learning_rate_schedules():
    cosine = lr_lambda(2, 10, "cosine")
    assert [round(cosine(s), 3) for s in (0, 1, 2, 6, 10)] == [0.333, 0.667, 1.0, 0.5, 0.0]
    linear = lr_lambda(0, 4, "linear")
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_lambda(1, 4, "constant")(3) == 1.0


def test_a_single_update_without_the_scoring_pass_gives_the_same_weights(tmp_path, tiny_model_dir, monkeypatch):
    """One optimizer step on the whole batch takes pi_old from the training forward pass instead of
    a separate scoring pass: the resulting weights must be those of the scoring path."""
    import agentrl.trainer.update as update_module

    single_update = update_module.single_update
    data = {
        "output_dir": str(tmp_path), "model": {"name": str(tiny_model_dir)},
        "env": {"name": "tests.helpers.ping_env:PingEnv", "eval_size": 2},
        "rollout": {"group_size": 3, "max_turns": 2, "max_new_tokens": 6, "max_response_tokens": 24},
        "trainer": {"steps": 1, "prompts_per_step": 2, "minibatch_size": 6, "micro_batch_size": 2, "lr": 1e-3,
                    "torch_threads": 1, "seed": 3},
    }
    results = []
    for fast in (True, False):
        monkeypatch.setattr(update_module, "single_update", lambda config, size, algo=None, fast=fast: fast)
        run = build_run(build_config(data))
        reward = run.env.reward
        run.env.reward = lambda task, trajectory, reward=reward: reward(task, trajectory).__class__(rewarded(trajectory))
        try:
            metrics, _ = train_step(run)
        finally:
            close_run(run)
        results.append((metrics, [p.detach().clone() for p in run.model.parameters()]))
    (fast_metrics, fast_weights), (slow_metrics, slow_weights) = results
    assert fast_metrics["grad_norm"] > 0
    assert fast_metrics["grad_norm"] == pytest.approx(slow_metrics["grad_norm"], rel=1e-4)
    assert fast_metrics["rollout/logprob_mismatch"] == pytest.approx(slow_metrics["rollout/logprob_mismatch"], abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fast_weights, slow_weights))
    assert single_update(build_config(data), 6) and not single_update(build_config(data), 7)
