"""A bare ``import verl`` registers agentrl's agent loop, estimators and losses through the
``verl.plugins`` entry point (runs in the verl environment; see tests/test_verl_env.py).

Each check starts a fresh interpreter, since verl loads its plugins once, when it is first imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl")

PROBE = """
import json, verl
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
print(json.dumps({"loops": {k: v["_target_"] for k, v in _agent_loop_registry.items()},
                  "estimators": sorted(ADV_ESTIMATOR_REGISTRY), "losses": sorted(POLICY_LOSS_REGISTRY),
                  "trainers": {k: v.__module__ for k, v in TRAINER_REGISTRY.items()}}))
"""


def probe(**environment: str) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **environment})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.fixture(scope="module")
def plain_import():
    return probe()


def test_a_bare_import_registers_the_agent_loop_estimators_and_losses(plain_import):
    found, _ = plain_import
    assert found["loops"]["agentrl"] == "agentrl.verl.agent_loop.AgentrlAgentLoop"
    assert {"agentrl_turn_grpo", "agentrl_gigpo"} <= set(found["estimators"])
    assert {found["trainers"][n] for n in ("agentrl_sync", "agentrl_colocate_async", "agentrl_separate_async")} == \
        {"agentrl.verl.trainer"}
    assert {"agentrl_ppo_clip", "agentrl_clip_cov", "agentrl_kl_cov", "agentrl_sil"} <= set(found["losses"])


def test_the_registration_is_logged_visibly(plain_import):
    _, stderr = plain_import
    assert "agentrl.verl: registered agent loop agentrl, estimators agentrl_turn_grpo" in stderr


def test_verls_builtins_keep_their_own_functions():
    import verl  # noqa: F401
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn

    for function in (get_adv_estimator_fn("grpo"), get_adv_estimator_fn("rloo"), get_policy_loss_fn("vanilla"),
                     get_policy_loss_fn("clip_cov"), get_policy_loss_fn("kl_cov")):
        assert function.__module__ == "verl.trainer.ppo.core_algos"
    assert get_adv_estimator_fn("agentrl_turn_grpo").__module__ == "agentrl.verl.algorithms"


def test_without_external_plugins_nothing_of_agentrls_is_registered():
    found, _ = probe(VERL_USE_EXTERNAL_PLUGINS="none")
    assert "agentrl" not in found["loops"] and "agentrl_turn_grpo" not in found["estimators"]


def test_importing_the_plugin_twice_is_harmless():
    import verl  # noqa: F401

    from agentrl.verl import plugin

    assert plugin.register() == plugin.registered()
