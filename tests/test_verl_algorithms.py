"""agentrl's estimators and losses called through verl 0.9.1, against agentrl's own functions and
verl's built-ins (runs in the verl environment; see tests/test_verl_env.py).

Registered ones are fetched with verl's ``get_adv_estimator_fn`` / ``get_policy_loss_fn`` (and the
estimator dispatched by verl's own ``compute_advantage``) and must give agentrl's numbers. agentrl's
GRPO, Dr.GRPO, RLOO, REINFORCE++(-baseline), GAE, PPO clip and Clip-Cov must agree with verl's
built-ins on random inputs where they are meant to: groups of two or more (verl gives a lone sample
its raw score, agentrl 0), and on the agent loop's outputs of multi-turn trajectories.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
import verl  # noqa: E402, F401
from verl.protocol import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig as VerlAlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

from agentrl.algos import advantages as adv  # noqa: E402
from agentrl.algos import losses  # noqa: E402
from agentrl.algos.spear import sil_loss  # noqa: E402
from agentrl.config import AlgoConfig, GigpoConfig  # noqa: E402
from agentrl.trainer.batching import collate  # noqa: E402
from agentrl.trainer.estimators import compute_advantages  # noqa: E402
from agentrl.trajectory import Trajectory  # noqa: E402
from agentrl.verl.agent_loop import Request, loop_output  # noqa: E402
from agentrl.verl.algorithms import GIGPO_FIELDS, gigpo_inputs  # noqa: E402


def trajectory(name: str, group: str, turns: list[int], turn_rewards: list[float], reward: float) -> Trajectory:
    """Assistant turns of the given lengths with a 2-token observation between them."""
    t = Trajectory(id=name, group_id=group, prompt_ids=[1, 2, 3])
    for index, length in enumerate(turns):
        t.append_model_tokens([7] * length, [-0.3] * length, index, 0)
        if index < len(turns) - 1:
            t.append_observation_tokens([9, 9], index)
    t.turn_rewards, t.reward = turn_rewards, reward
    return t


HAND_BUILT = [
    trajectory("a0", "a", [2, 3, 1], [0.5, 0.0, 0.0], 1.0),
    trajectory("a1", "a", [4], [0.0], 0.0),
    trajectory("a2", "a", [1, 2], [0.5, 0.25], 1.0),
    trajectory("b0", "b", [3, 3], [0.0, 1.0], 0.0),
    trajectory("b1", "b", [2, 1, 2], [0.0, 0.0, 0.5], 1.0),
]


def verl_rows(trajectories: list[Trajectory]) -> DataProto:
    """What verl's advantage step holds for these trajectories: each one's ``rm_scores`` as the
    agent loop's output puts it (``as_dict``), its response mask and its group ``uid``, padded."""
    fields = [loop_output(t, Request("r", {}), 0, 64, 64, 0.0).as_dict() for t in trajectories]
    width = max(len(f["response_mask"]) for f in fields)
    mask = torch.zeros(len(fields), width, dtype=torch.int64)
    scores = torch.zeros(len(fields), width)
    for row, f in enumerate(fields):
        mask[row, : len(f["response_mask"])] = f["response_mask"]
        scores[row, : len(f["rm_scores"])] = f["rm_scores"]
    data = DataProto.from_dict(tensors={"response_mask": mask, "token_level_rewards": scores},
                               non_tensors={"uid": np.array([t.group_id for t in trajectories], dtype=object)})
    return data


@pytest.mark.parametrize("gamma,norm_std", [(1.0, True), (0.9, True), (0.7, False)])
def test_turn_grpo_through_verl_equals_the_local_estimator(gamma, norm_std):
    local_batch = collate(HAND_BUILT, 0)
    local, _ = compute_advantages(local_batch, local_batch.loss_mask,
                                  AlgoConfig(advantage="turn_grpo", turn_gamma=gamma, norm_std=norm_std))
    assert core_algos.get_adv_estimator_fn("agentrl_turn_grpo").__module__ == "agentrl.verl.algorithms"
    data = compute_advantage(verl_rows(HAND_BUILT), adv_estimator="agentrl_turn_grpo", gamma=gamma,
                             config=VerlAlgoConfig(gamma=gamma, norm_adv_by_std_in_grpo=norm_std))
    width = local.shape[1]
    torch.testing.assert_close(data.batch["advantages"][:, :width].double(), local.double(), atol=1e-6, rtol=1e-5)
    assert data.batch["advantages"][:, width:].abs().sum() == 0
    assert local.abs().sum() > 0


def test_a_reward_on_a_trailing_observation_counts_for_the_last_turn():
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]])
    at_turn_end = torch.tensor([[0, 0, 0, 1.0, 0, 0], [0, 0, 0, 0, 0.0, 0]])
    at_last_token = torch.tensor([[0, 0, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, 0.0]])
    estimator = core_algos.get_adv_estimator_fn("agentrl_turn_grpo")
    index = np.array(["g", "g"], dtype=object)
    first, _ = estimator(token_level_rewards=at_turn_end, response_mask=mask, index=index, config=None)
    second, _ = estimator(token_level_rewards=at_last_token, response_mask=mask, index=index, config=None)
    torch.testing.assert_close(first, second)
    assert first[0, 0] > 0 > first[1, 0]


# -- GiGPO ---------------------------------------------------------------------------------------


def episode(name: str, group: str, prompt: list[int], turns: list[int], observations: list[list[int]],
            turn_rewards: list[float], reward: float) -> Trajectory:
    """Assistant turns of the given lengths, each followed by a template token and the next
    observation; turns of a group that answer the same prompt or observation share an anchor state."""
    t = Trajectory(id=name, group_id=group, prompt_ids=list(prompt))
    for index, length in enumerate(turns):
        t.append_model_tokens([7] * length, [-0.3] * length, index, 0)
        if index < len(turns) - 1:
            t.append_observation_tokens([2], index, role="template")
            t.append_observation_tokens(observations[index], index)
    t.turn_rewards, t.reward = turn_rewards, reward
    return t


ANCHORED = [
    episode("a0", "a", [1, 2, 3], [2, 3, 1], [[9, 9], [8]], [0.5, 0.0, 0.0], 1.0),
    episode("a1", "a", [1, 2, 3], [4], [], [0.0], 0.0),
    episode("a2", "a", [1, 2, 3], [1, 2], [[9, 9]], [0.5, 0.25], 1.0),  # its second turn answers a0's [9, 9]
    episode("a3", "a", [1, 2, 3], [2, 2, 2], [[5, 5], [8]], [0.0, 0.0, 0.3], 0.0),  # its third a0's [8]
    episode("b0", "b", [4, 5], [3, 3], [[7]], [0.0, 1.0], 0.0),
    episode("b1", "b", [4, 5], [2, 1, 2], [[7], [7]], [0.0, 0.0, 0.5], 1.0),  # [7] twice: one step group
    episode("b2", "b", [4, 5], [1, 4], [[6]], [0.2, 0.0], 0.0),
]


def loop_fields(trajectories: list[Trajectory]) -> dict[str, torch.Tensor]:
    """The agent loop's outputs (``as_dict``, what verl stores per sample) padded by verl's own
    ``list_of_dict_to_tensordict`` and ``to_padded_tensor``, as its v1 advantage step reads them."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    names = ("response_mask", "rm_scores", *GIGPO_FIELDS)
    outputs = [loop_output(t, Request("r", {}), 0, 64, 64, 0.0).as_dict() for t in trajectories]
    padded = list_of_dict_to_tensordict([{n: o[n] for n in names} for o in outputs]).to_padded_tensor()
    return {n: padded[n] for n in names}


def local_gigpo(trajectories: list[Trajectory], step_weight: float, gamma: float, norm_std: bool) -> torch.Tensor:
    batch = collate(trajectories, 0)
    algo = AlgoConfig(advantage="gigpo", norm_std=norm_std, gigpo=GigpoConfig(step_weight=step_weight, gamma=gamma))
    advantages, _ = compute_advantages(batch, batch.loss_mask, algo)
    return advantages


@pytest.mark.parametrize("step_weight,gamma,norm_std", [(1.0, 0.95, True), (0.5, 1.0, True), (2.0, 0.8, False)])
def test_gigpo_through_verls_advantage_step_equals_the_local_estimator(step_weight, gamma, norm_std):
    local = local_gigpo(ANCHORED, step_weight, gamma, norm_std)
    assert core_algos.get_adv_estimator_fn("agentrl_gigpo").__module__ == "agentrl.verl.algorithms"
    fields = loop_fields(ANCHORED)
    data = DataProto.from_dict(tensors={"response_mask": fields["response_mask"], "token_level_rewards": fields["rm_scores"]},
                               non_tensors={"uid": np.array([t.group_id for t in ANCHORED], dtype=object)})
    with gigpo_inputs(fields["agentrl_token_turns"], fields["agentrl_token_anchors"], step_weight):
        data = compute_advantage(data, adv_estimator="agentrl_gigpo", gamma=gamma,
                                 config=VerlAlgoConfig(gamma=gamma, norm_adv_by_std_in_grpo=norm_std))
    width = local.shape[1]
    torch.testing.assert_close(data.batch["advantages"][:, :width].double(), local.double(), atol=1e-6, rtol=1e-5)
    assert data.batch["advantages"][:, width:].abs().sum() == 0
    # the step-level part is there: without it the advantages differ
    assert not torch.allclose(local, local_gigpo(ANCHORED, 0.0, gamma, norm_std))


def test_gigpo_with_the_kl_in_the_reward_equals_the_local_estimator():
    """verl's ``use_kl_in_reward`` subtracts ``beta * KL`` from the token rewards; each turn's summed
    KL leaves that turn's reward, as in the local trainer."""
    fields = loop_fields(ANCHORED)
    batch = collate(ANCHORED, 0)
    token_kl = torch.rand(batch.loss_mask.shape, generator=torch.Generator().manual_seed(3))
    algo = AlgoConfig(advantage="gigpo", kl_coef=0.2, kl_in_reward=True, gigpo=GigpoConfig(step_weight=0.7, gamma=0.9))
    local, _ = compute_advantages(batch, batch.loss_mask, algo, token_kl=token_kl)
    kl = torch.zeros_like(fields["rm_scores"])
    kl[:, : token_kl.shape[1]] = token_kl
    rewards = fields["rm_scores"] - 0.2 * kl * fields["response_mask"]  # verl's apply_kl_penalty
    advantages, _ = core_algos.get_adv_estimator_fn("agentrl_gigpo")(
        token_level_rewards=rewards, response_mask=fields["response_mask"],
        index=np.array([t.group_id for t in ANCHORED], dtype=object), config=VerlAlgoConfig(gamma=0.9),
        token_turns=fields["agentrl_token_turns"], token_anchors=fields["agentrl_token_anchors"], step_weight=0.7)
    torch.testing.assert_close(advantages[:, : local.shape[1]].double(), local.double(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(local, local_gigpo(ANCHORED, 0.7, 0.9, True))


def test_gigpo_takes_its_fields_as_arguments_and_refuses_to_run_without_them():
    fields = loop_fields(ANCHORED)
    estimator = core_algos.get_adv_estimator_fn("agentrl_gigpo")
    index = np.array([t.group_id for t in ANCHORED], dtype=object)
    advantages, _ = estimator(token_level_rewards=fields["rm_scores"], response_mask=fields["response_mask"],
                              index=index, config=VerlAlgoConfig(gamma=0.9), token_turns=fields["agentrl_token_turns"],
                              token_anchors=fields["agentrl_token_anchors"], step_weight=0.5)
    width = len(max(ANCHORED, key=lambda t: len(t.response_ids)).response_ids)
    torch.testing.assert_close(advantages[:, :width].double(), local_gigpo(ANCHORED, 0.5, 0.9, True).double(),
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="trainer.v1.trainer_mode=agentrl_sync"):
        estimator(token_level_rewards=fields["rm_scores"], response_mask=fields["response_mask"], index=index)


def test_a_failed_trajectory_has_no_turns_for_gigpo_and_only_its_zero_reward_in_the_episode_baseline():
    failed = episode("a4", "a", [1, 2, 3], [2, 2], [[9, 9]], [0.0, 0.0], 1.0)
    failed.status = "infra_error"
    fields = loop_fields([*ANCHORED, failed])
    assert fields["agentrl_token_turns"][-1].abs().sum() == 0 and fields["response_mask"][-1].sum() == 0
    index = np.array([t.group_id for t in ANCHORED] + ["a"], dtype=object)
    advantages, _ = core_algos.get_adv_estimator_fn("agentrl_gigpo")(
        token_level_rewards=fields["rm_scores"], response_mask=fields["response_mask"], index=index,
        token_turns=fields["agentrl_token_turns"], token_anchors=fields["agentrl_token_anchors"], step_weight=1.0)
    assert advantages[-1].abs().sum() == 0
    zero = episode("a4", "a", [1, 2, 3], [], [], [], 0.0)  # the same row as a turnless zero-reward trajectory
    local = local_gigpo([*ANCHORED, zero], 1.0, 1.0, True)
    torch.testing.assert_close(advantages[:, : local.shape[1]].double(), local.double(), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def transfer_queue():
    import ray
    import transfer_queue as tq
    from omegaconf import OmegaConf

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()


@pytest.mark.timeout(300)
def test_gigpo_under_agentrls_registered_trainer_reads_the_loops_fields_from_transfer_queue(transfer_queue, tmp_path):
    """verl's own v1 advantage step on the composed config, through TransferQueue: the trainer that
    ``algo.advantage=gigpo`` selects fetches the agent loop's turn fields for the batch's keys."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.trainer.ppo.v1.trainer_base import get_trainer_cls
    from verl.utils.config import validate_config
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    from agentrl.config import build_config
    from agentrl.verl.launch import verl_overrides
    from tests.test_verl_data import compose_verl

    config = build_config({"algo": {"advantage": "gigpo", "gigpo": {"step_weight": 0.5, "gamma": 0.9}},
                           "trainer": {"backend": "verl", "minibatch_size": 8}, "rollout": {"group_size": 4}})
    verl_config = compose_verl(verl_overrides(config, tmp_path))
    validate_config(verl_config, use_reference_policy=need_reference_policy(verl_config),
                    use_critic=need_critic(verl_config))
    OmegaConf.resolve(verl_config)
    assert verl_config.trainer.v1.trainer_mode == "agentrl_sync" and verl_config.agentrl.gigpo.step_weight == 0.5
    assert (verl_config.algorithm.adv_estimator, verl_config.algorithm.gamma) == ("agentrl_gigpo", 0.9)
    trainer = object.__new__(get_trainer_cls(verl_config.trainer.v1.trainer_mode))  # its advantage step needs no GPU
    trainer.config = verl_config
    assert trainer.trainer_mode == "sync"  # verl's own mode, which verl's code branches on
    with pytest.raises(ValueError, match="does not name AgentrlTrainerSync"):
        trainer.trainer_mode = "separate_async"

    order = [3, 0, 6, 1, 5, 2, 4]  # stored and fetched in another order than the local batch
    fields = []
    for row in order:
        field = loop_output(ANCHORED[row], Request("r", {}), 0, 64, 64, 0.0).as_dict()
        field.update(uid=ANCHORED[row].group_id, session_id=row)
        field["loss_mask"] = field["response_mask"]
        field["old_log_probs"] = field["rollout_log_probs"]  # what verl's actor stores before this step
        fields.append(field)
    keys = [f"{ANCHORED[row].group_id}_{row}_0" for row in order]
    batch = transfer_queue.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(fields))
    trainer._compute_advantage(batch, metrics={})
    stored = transfer_queue.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages"])
    advantages = stored.to_padded_tensor()["advantages"]
    local = local_gigpo(ANCHORED, 0.5, 0.9, True)
    width = min(local.shape[1], advantages.shape[1])
    torch.testing.assert_close(advantages[:, :width].double(), local[order][:, :width].double(), atol=1e-6, rtol=1e-5)
    assert local[order][:, width:].abs().sum() == 0


# -- verl's built-in estimators and agentrl's ---------------------------------------------------


def random_batch(seed: int, groups: int = 4, size: int = 4, width: int = 12):
    generator = torch.Generator().manual_seed(seed)
    rows = groups * size
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()  # one response span per row
    rewards = torch.randn(rows, generator=generator)
    group_ids = torch.arange(groups).repeat_interleave(size)
    index = np.array([f"uid-{g}" for g in group_ids.tolist()], dtype=object)
    return mask, rewards, group_ids, index, adv.last_token_rewards(rewards, mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_dr_grpo_and_rloo_agree_with_verls_builtins(seed):
    mask, rewards, group_ids, index, token_rewards = random_batch(seed)
    verl_grpo, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, index)
    torch.testing.assert_close(verl_grpo, adv.broadcast_to_tokens(adv.grpo_advantages(rewards, group_ids), mask))
    verl_dr, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, index, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(verl_dr, adv.broadcast_to_tokens(adv.dr_grpo_advantages(rewards, group_ids), mask))
    verl_rloo, _ = core_algos.compute_rloo_outcome_advantage(token_rewards, mask, index)
    torch.testing.assert_close(verl_rloo, adv.broadcast_to_tokens(adv.rloo_advantages(rewards, group_ids), mask))


@pytest.mark.parametrize("seed", [0, 1])
def test_reinforce_pp_and_its_baseline_variant_agree_with_verls_builtins(seed):
    mask, rewards, group_ids, index, token_rewards = random_batch(seed)
    config = VerlAlgoConfig(gamma=0.95)
    verl_rpp, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(token_rewards, mask, config=config)
    torch.testing.assert_close(verl_rpp * mask, adv.reinforce_pp_advantages(rewards, mask, gamma=0.95), atol=1e-5, rtol=1e-5)
    verl_base, _ = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(token_rewards, mask, index)
    torch.testing.assert_close(verl_base, adv.reinforce_pp_baseline_advantages(rewards, group_ids, mask),
                               atol=1e-5, rtol=1e-5)


def test_verls_builtins_on_the_loops_multi_turn_outputs_equal_the_local_estimators():
    """The agent loop's outputs of multi-turn trajectories, one ending in an observation and some
    with per-turn rewards a sequence-level estimator does not read: verl's GRPO, RLOO, REINFORCE++
    (and its baseline variant) and GAE returns give the local trainer's numbers."""
    import copy

    trajectories = [copy.deepcopy(t) for t in ANCHORED]
    trailing = episode("a4", "a", [1, 2, 3], [2, 2], [[9, 9]], [0.0, 0.0], 1.0)
    trailing.append_observation_tokens([4, 4], 1)  # the budget ran out after the observation
    trajectories.append(trailing)
    outputs = [loop_output(t, Request("r", {}), 0, 64, 64, 0.0, per_turn_rewards=False).as_dict() for t in trajectories]
    assert outputs[-1]["rm_scores"].tolist() == [0, 0, 0, 0, 0, 0, 1.0, 0, 0]  # on the last model token
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    padded = list_of_dict_to_tensordict([{n: o[n] for n in ("response_mask", "rm_scores")} for o in outputs])
    padded = padded.to_padded_tensor()
    rewards, mask = padded["rm_scores"], padded["response_mask"]
    index = np.array([t.group_id for t in trajectories], dtype=object)
    batch = collate(trajectories, 0)
    width = batch.loss_mask.shape[1]
    for name, verl_name in [("grpo", "grpo"), ("rloo", "rloo"), ("reinforce_pp", "reinforce_plus_plus"),
                            ("reinforce_pp_baseline", "reinforce_plus_plus_baseline")]:
        local, _ = compute_advantages(batch, batch.loss_mask, AlgoConfig(advantage=name, gamma=0.9))
        ours, _ = core_algos.get_adv_estimator_fn(verl_name)(token_level_rewards=rewards, response_mask=mask,
                                                              index=index, config=VerlAlgoConfig(gamma=0.9))
        torch.testing.assert_close(ours[:, :width].double(), local.double(), atol=1e-5, rtol=1e-5, msg=name)
    values = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    _, verl_returns = core_algos.compute_gae_advantage_return(rewards, values, mask, 0.97, 0.9)
    _, returns = adv.gae_advantages(adv.last_token_rewards(batch.rewards, batch.loss_mask), values[:, :width],
                                    batch.loss_mask, 0.97, 0.9)
    valid = batch.loss_mask > 0
    torch.testing.assert_close(verl_returns[:, :width][valid], returns[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_gae_agrees_with_verls_builtin_across_observation_spans(seed):
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.rand(6, 16, generator=generator) > 0.3).float()  # model tokens interleaved with observations
    mask[:, 0] = 1
    values = torch.randn(6, 16, generator=generator)
    token_rewards = adv.last_token_rewards(torch.randn(6, generator=generator), mask)
    verl_advantages, verl_returns = core_algos.compute_gae_advantage_return(token_rewards, values, mask, 0.97, 0.9)
    ours, returns = adv.gae_advantages(token_rewards, values, mask, 0.97, 0.9)
    valid = mask > 0
    torch.testing.assert_close(verl_returns[valid], returns[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(verl_advantages[valid], adv.masked_whiten(ours, mask)[valid], atol=1e-5, rtol=1e-5)


# -- losses ---------------------------------------------------------------------------------------


def actor_config(**fields) -> ActorConfig:
    policy = PolicyLossConfig(**{k: fields.pop(k) for k in list(fields) if k in PolicyLossConfig.__dataclass_fields__})
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, policy_loss=policy,
                         **fields)
    return config


def loss_inputs(seed: int, rows: int = 8, width: int = 20):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=generator) * 3
    new = old + 0.4 * torch.randn(rows, width, generator=generator)
    advantages = torch.randn(rows, width, generator=generator)
    mask = (torch.rand(rows, width, generator=generator) > 0.25).float()
    new[0, :5], advantages[0, :5], mask[0, :5] = old[0, :5] + 2.0, -1.0, 1.0  # ratio e^2 > 3 with A < 0: dual clip
    return old, new, advantages, mask


def call(name: str, config: ActorConfig, old, new, advantages, mask, mode: str = "token-mean"):
    function = core_algos.get_policy_loss_fn(name)
    return function(old_log_prob=old, log_prob=new, advantages=advantages, response_mask=mask, loss_agg_mode=mode,
                    config=config, rollout_is_weights=None)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_ppo_clip_with_dual_clip_agrees_with_verls_vanilla_loss(mode):
    old, new, advantages, mask = loss_inputs(0)
    config = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    verl_loss, _ = call("vanilla", config, old, new, advantages, mask, mode)
    ours, _ = call("agentrl_ppo_clip", config, old, new, advantages, mask, mode)
    token_loss, _ = losses.ppo_clip_loss(new, old, advantages, 0.2, 0.28, 3.0, loss_mask=mask)
    torch.testing.assert_close(ours, verl_loss)
    torch.testing.assert_close(ours, losses.aggregate_loss(token_loss, mask, mode))


def test_ppo_clip_without_dual_clip_is_agentrls_default():
    old, new, advantages, mask = loss_inputs(1)
    ours, _ = call("agentrl_ppo_clip", actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1.0),
                   old, new, advantages, mask)
    token_loss, _ = losses.ppo_clip_loss(new, old, advantages, 0.2, 0.28, None, loss_mask=mask)
    torch.testing.assert_close(ours, losses.aggregate_loss(token_loss, mask, "token-mean"))
    verl_loss, _ = call("vanilla", actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0),
                        old, new, advantages, mask)
    assert not torch.isclose(ours, verl_loss)  # verl's vanilla always applies its dual clip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_cov_agrees_with_verls_builtin(seed):
    old, new, advantages, mask = loss_inputs(seed)
    config = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_cov_ratio=0.05, clip_cov_lb=0.0, clip_cov_ub=5.0)
    torch.manual_seed(seed)  # both draw the detached tokens with the global generator, in the same order
    verl_loss, _ = call("clip_cov", config, old, new, advantages, mask)
    torch.manual_seed(seed)
    ours, metrics = call("agentrl_clip_cov", config, old, new, advantages, mask)
    torch.testing.assert_close(ours, verl_loss)
    assert metrics["actor/clip_cov_fraction"] > 0


def test_kl_cov_agrees_with_verls_builtin():
    old, new, advantages, mask = loss_inputs(3)
    config = actor_config(kl_cov_ratio=0.05, ppo_kl_coef=0.5)
    verl_loss, _ = call("kl_cov", config, old, new, advantages, mask)
    ours, _ = call("agentrl_kl_cov", config, old, new, advantages, mask)
    torch.testing.assert_close(ours, verl_loss)


def test_sil_through_verl_equals_spears_sil_loss_and_splits_over_ranks():
    old, new, advantages, mask = loss_inputs(4)
    advantages = advantages.abs()  # replayed rows have positive advantages
    config = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_cov_ratio=0.02, clip_cov_lb=2.0, clip_cov_ub=60.0)
    torch.manual_seed(0)
    ours, metrics = call("agentrl_sil", config, old, new, advantages, mask)
    torch.manual_seed(0)
    expected, _ = sil_loss(new, old, advantages, mask, 1.0, clip_low=0.2, clip_high=0.28, clip_cov_ratio=0.02,
                           cov_lower=2.0, cov_upper=60.0, aggregation="token-mean")
    torch.testing.assert_close(ours, expected)
    assert "actor/sil_loss" in metrics
    # two data-parallel ranks with the global token count: the mean of their losses is the whole
    # batch's (a band no token reaches, so no random draw differs between the halves and the whole)
    config = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_cov_ratio=0.02, clip_cov_lb=1e6, clip_cov_ub=1e7)
    whole, _ = call("agentrl_sil", config, old, new, advantages, mask)
    config.global_batch_info.update(dp_size=2, batch_num_tokens=float(mask.sum()), global_batch_size=8)
    halves = [call("agentrl_sil", config, old[part], new[part], advantages[part], mask[part])[0]
              for part in (slice(0, 3), slice(3, 8))]
    torch.testing.assert_close(sum(halves) / 2, whole)


def test_sil_refuses_rollout_correction_weights():
    old, new, advantages, mask = loss_inputs(5)
    with pytest.raises(ValueError, match="rollout_correction"):
        core_algos.get_policy_loss_fn("agentrl_sil")(old, new, advantages, mask, "token-mean",
                                                      actor_config(), torch.ones_like(mask))
