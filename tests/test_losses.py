"""Each loss on toy tensors against known values, and the property everything rests on: tokens
outside the loss mask get exactly zero gradient."""

import math

import pytest
import torch

from agentrl.algos.losses import (
    aggregate_loss,
    clip_cov_loss,
    entropy_from_logits,
    kl_cov_loss,
    kl_penalty,
    ppo_clip_loss,
    stale_importance_weights,
    value_loss,
)
from agentrl.trainer.batching import collate, forward_response
from agentrl.trajectory import Trajectory


def close(actual, expected, tol=1e-5):
    assert torch.allclose(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=tol), (actual, expected)


def test_ppo_clip_uses_separate_low_and_high_bounds():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7, 0.9]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0]])
    loss, clipped = ppo_clip_loss(ratio.log(), torch.zeros_like(ratio), advantages, clip_low=0.2, clip_high=0.28)
    # 1.5 -> capped at 1.28 for A>0; 0.5 -> floored at 0.8 for A<0; 1.1 inside; 0.7 with A>0 is
    # pessimistic already (-0.7 > -0.8); 0.9 with A<0 inside
    close(loss, [[-1.28, 0.8, -1.1, -0.7, 0.9]])
    assert clipped.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]


def test_clipped_tokens_get_no_gradient_and_unclipped_ones_do():
    logprobs = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = ppo_clip_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), 0.2, 0.28)
    loss.sum().backward()
    close(logprobs.grad, [[0.0, -1.1]])


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    ratio = torch.tensor([[5.0, 5.0, 2.0]])
    advantages = torch.tensor([[-1.0, 1.0, -1.0]])
    loss, _ = ppo_clip_loss(ratio.log(), torch.zeros_like(ratio), advantages, 0.2, 0.28, dual_clip=3.0)
    close(loss, [[3.0, -1.28, 2.0]])
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(ratio.log(), torch.zeros_like(ratio), advantages, dual_clip=0.5)


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize(("mode", "expected"), [
    ("token-mean", 7 / 3),
    ("seq-mean-token-sum", 3.5),
    ("seq-mean-token-mean", (1.5 + 4.0) / 2),
    ("dr-grpo", 7 / (2 * 4)),
])
def test_aggregation_modes(mode, expected):
    assert aggregate_loss(LOSS, MASK, mode, max_response_tokens=4).item() == pytest.approx(expected)


def test_aggregation_with_minibatch_normalisers_sums_over_micro_batches():
    whole = aggregate_loss(LOSS, MASK, "token-mean")
    parts = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], "token-mean", batch_tokens=3) for i in range(2))
    assert parts.item() == pytest.approx(whole.item())
    whole = aggregate_loss(LOSS, MASK, "seq-mean-token-mean")
    parts = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], "seq-mean-token-mean", batch_sequences=2) for i in range(2))
    assert parts.item() == pytest.approx(whole.item())


def test_aggregation_ignores_non_finite_values_on_masked_tokens():
    loss = torch.tensor([[1.0, float("inf"), float("nan")]])
    assert aggregate_loss(loss, torch.tensor([[1, 0, 0]])).item() == 1.0


def test_dr_grpo_aggregation_needs_the_response_budget():
    with pytest.raises(ValueError, match="max_response_tokens"):
        aggregate_loss(LOSS, MASK, "dr-grpo")


def test_kl_estimators():
    logprobs, ref = torch.zeros(1), torch.tensor([math.log(2.0)])
    assert kl_penalty(logprobs, ref, "k1").item() == pytest.approx(-math.log(2.0))
    assert kl_penalty(logprobs, ref, "k3").item() == pytest.approx(1.0 - math.log(2.0))
    assert kl_penalty(logprobs, ref, "low_var_kl").item() == pytest.approx(1.0 - math.log(2.0))
    assert kl_penalty(torch.zeros(1), torch.tensor([30.0]), "low_var_kl").item() == 10.0
    assert kl_penalty(torch.zeros(1), torch.zeros(1), "k3").item() == 0.0


def test_k3_matches_the_true_kl_in_expectation():
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(8, generator=generator), 0)
    q = torch.softmax(torch.randn(8, generator=generator), 0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    estimate = kl_penalty(p.log()[samples], q.log()[samples], "k3").mean().item()
    assert estimate == pytest.approx(float((p * (p / q).log()).sum()), rel=0.03)


def test_entropy_of_uniform_and_peaked_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    close(entropy_from_logits(logits), [math.log(4.0), 0.0])


def test_stale_importance_weights_are_truncated_and_only_for_stale_tokens():
    old = torch.tensor([[0.0, math.log(0.5), 0.0]])
    sampling = torch.tensor([[math.log(0.25), 0.0, math.log(0.25)]])
    weights = stale_importance_weights(old, sampling, torch.tensor([[1, 1, 0]]), cap=2.0)
    close(weights, [[2.0, 0.5, 1.0]])


COV_LOGPROBS = torch.tensor([[0.0, -2.0, -2.0, -2.0]])  # centred: [1.5, -0.5, -0.5, -0.5]
COV_ADVANTAGES = torch.tensor([[3.0, 1.0, 1.0, 1.0]])  # centred: [1.5, -0.5, -0.5, -0.5]; Cov = [2.25, .25, .25, .25]


def test_clip_cov_detaches_high_covariance_tokens():
    logprobs = COV_LOGPROBS.clone().requires_grad_()
    loss, detached = clip_cov_loss(logprobs, COV_LOGPROBS, COV_ADVANTAGES, torch.ones(1, 4), clip_ratio=0.25)
    assert detached.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    close(loss, [[0.0, -1.0, -1.0, -1.0]])
    loss.sum().backward()
    close(logprobs.grad, [[0.0, -1.0, -1.0, -1.0]])


def test_clip_cov_leaves_tokens_outside_the_covariance_band_alone():
    _, detached = clip_cov_loss(COV_LOGPROBS, COV_LOGPROBS, COV_ADVANTAGES, torch.ones(1, 4), clip_ratio=1.0, cov_lower=3.0)
    assert detached.sum().item() == 0.0


def test_kl_cov_penalises_the_top_covariance_tokens():
    old = COV_LOGPROBS - torch.tensor([[0.1, 0.1, 0.0, 0.0]])
    loss, penalised = kl_cov_loss(COV_LOGPROBS, old, COV_ADVANTAGES, torch.ones(1, 4), kl_ratio=0.25, kl_coef=2.0)
    assert penalised.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    close(loss, [[-3.0 * math.exp(0.1) + 2.0 * 0.1, -math.exp(0.1), -1.0, -1.0]])


def test_kl_cov_ignores_masked_tokens():
    mask = torch.tensor([[0, 1, 1, 1]])
    _, penalised = kl_cov_loss(COV_LOGPROBS, COV_LOGPROBS, COV_ADVANTAGES, mask, kl_ratio=1.0)
    assert penalised[0, 0].item() == 0.0


def test_value_loss_is_clipped_around_the_old_value():
    close(value_loss(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.0]), clip=0.2), [0.5])
    close(value_loss(torch.tensor([0.6]), torch.tensor([0.5]), torch.tensor([1.0]), clip=0.2), [0.5 * 0.4 ** 2])


def _trajectory(tokenizer, index: int) -> Trajectory:
    trajectory = Trajectory(id=f"t{index}", group_id="g", prompt_ids=tokenizer.encode("Question: what is 2+2?"))
    call = tokenizer.encode(" <python>print(2+2)</python>")
    answer = tokenizer.encode(" <answer>4</answer>")[: 5 + index]
    trajectory.append_model_tokens(call, [-1.0] * len(call), 0, 0)
    trajectory.append_observation_tokens(tokenizer.encode("\n<output>\n4\n</output>\n")[: 6 + index], 0)
    trajectory.append_model_tokens(answer, [-1.0] * len(answer), 1, 0)
    trajectory.validate()
    trajectory.reward = float(index)
    return trajectory


def test_observation_tokens_get_exactly_zero_gradient(tokenizer, tiny_model):
    trajectories = [_trajectory(tokenizer, i) for i in range(3)]
    batch = collate(trajectories, tokenizer.pad_token_id)
    captured = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    tiny_model.train()
    handle = tiny_model.lm_head.register_forward_hook(keep_logits)
    outputs = forward_response(tiny_model, batch, with_entropy=True)
    handle.remove()
    advantages = torch.randn(batch.loss_mask.shape, generator=torch.Generator().manual_seed(0))
    token_loss, _ = ppo_clip_loss(outputs.logprobs, outputs.logprobs.detach() + 0.05, advantages, 0.2, 0.28)
    token_loss = token_loss - 0.01 * outputs.entropy + 0.1 * kl_penalty(outputs.logprobs, outputs.logprobs.detach() - 0.1)
    aggregate_loss(token_loss, batch.loss_mask).backward()

    # logits[:, t] predicts response token t; its gradient is nonzero exactly on model tokens
    gradient = captured["logits"].grad[:, :-1].abs().sum(-1)
    masked = batch.loss_mask == 0
    assert masked.sum() > 10 and (~masked).sum() > 10
    assert torch.all(gradient[masked] == 0.0)
    assert torch.all(gradient[~masked] > 0.0)
    assert torch.all(captured["logits"].grad[:, -1] == 0.0)  # the column after the last token


def test_masked_positions_do_not_change_the_weight_gradient(tokenizer, tiny_model):
    """Whatever happens at observation tokens (huge advantages, different old logprobs) the update
    is bit-for-bit the same."""
    batch = collate([_trajectory(tokenizer, i) for i in range(2)], tokenizer.pad_token_id)
    advantages = torch.ones(batch.loss_mask.shape)

    def gradient(advantage_noise: float):
        tiny_model.zero_grad()
        outputs = forward_response(tiny_model, batch)
        noisy = advantages + advantage_noise * (1 - batch.loss_mask)
        old = outputs.logprobs.detach() - advantage_noise * (1 - batch.loss_mask)
        token_loss, _ = ppo_clip_loss(outputs.logprobs, old, noisy, 0.2, 0.28, loss_mask=batch.loss_mask)
        aggregate_loss(token_loss, batch.loss_mask).backward()
        return torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])

    assert torch.equal(gradient(0.0), gradient(1e6))


# -- numerical guards and estimator choices ------------------------------------------------------


@pytest.mark.parametrize("advantage", [1.0, -1.0])
@pytest.mark.parametrize("surrogate", ["ppo", "ppo_dual", "clip_cov", "kl_cov"])
def test_an_overflowing_log_ratio_on_a_valid_token_gives_a_finite_gradient(surrogate, advantage):
    logprobs = torch.tensor([[100.0, -1.0]], requires_grad=True)  # exp(100) overflows fp32
    old = torch.tensor([[0.0, -1.0]])
    advantages = torch.full((1, 2), advantage)
    mask = torch.ones(1, 2)
    if surrogate == "ppo":
        loss, _ = ppo_clip_loss(logprobs, old, advantages, loss_mask=mask)
    elif surrogate == "ppo_dual":
        loss, _ = ppo_clip_loss(logprobs, old, advantages, dual_clip=3.0, loss_mask=mask)
    elif surrogate == "clip_cov":
        loss, _ = clip_cov_loss(logprobs, old, advantages, mask)
    else:
        loss, _ = kl_cov_loss(logprobs, old, advantages, mask)
    aggregate_loss(loss, mask).backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logprobs.grad).all()


def test_k2_is_half_the_squared_log_ratio_and_mse_is_its_name_in_verl():
    logprobs, ref = torch.tensor([-1.0]), torch.tensor([-3.0])
    assert kl_penalty(logprobs, ref, "k2").item() == pytest.approx(2.0)
    assert kl_penalty(logprobs, ref, "mse").item() == pytest.approx(2.0)


def test_k3_on_a_masked_position_cannot_poison_the_gradient():
    logprobs = torch.tensor([[-1.0, -200.0]], requires_grad=True)  # exp(ref - logp) = exp(199) on the pad
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.tensor([[1.0, 0.0]])
    aggregate_loss(kl_penalty(logprobs, ref, "k3", loss_mask=mask), mask).backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 1] == 0.0


def _exact_reward_kl_gradient(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact expectation over a categorical policy of the score-function gradient of a per-token
    KL reward ``E_a[k(a) grad log pi(a)]``, against the true ``grad KL(pi || ref)``."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(20, generator=generator, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(logits.detach() + 1.5 * torch.randn(20, generator=generator, dtype=torch.float64), 0)
    logp = torch.log_softmax(logits, 0)
    estimate = kl_penalty(logp.detach(), ref, kind)
    (grad_estimate,) = torch.autograd.grad((logp.exp().detach() * estimate * logp).sum(), logits)
    logp = torch.log_softmax(logits, 0)
    (grad_true,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), logits)
    return grad_estimate, grad_true


def test_k1_in_the_reward_follows_the_kl_gradient_and_k3_does_not():
    grad_k1, grad_true = _exact_reward_kl_gradient("k1")
    assert torch.allclose(grad_k1, grad_true, atol=1e-10)
    grad_k3, grad_true = _exact_reward_kl_gradient("k3")
    cosine = float(torch.nn.functional.cosine_similarity(grad_k3, grad_true, dim=0))
    assert cosine < 0.95


def test_sequence_level_aggregations_do_not_count_emptied_rows():
    loss = torch.tensor([[1.0, 1.0], [5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # the second row was overlong-filtered
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(1.0)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(2.0)
    assert aggregate_loss(loss, mask, "dr-grpo", max_response_tokens=2).item() == pytest.approx(1.0)
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(1.0)
