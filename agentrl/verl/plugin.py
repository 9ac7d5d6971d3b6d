"""The ``verl.plugins`` entry point: ``import verl`` imports this module in every verl process.

Importing it registers the ``agentrl`` agent loop (read by verl's agent-loop workers), the
estimators (read by the TaskRunner) and the policy losses (read by the actor workers), then checks
that each landed in verl's registry and says so at INFO on stderr. verl swallows a plugin's import
error at DEBUG level, so a plugin that fails leaves no trace; :func:`registered` is the check a
user (or ``agentrl train trainer.backend=verl``) can run instead::

    python -c "import verl, agentrl.verl.plugin as p; print(p.registered())"
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("agentrl.verl")

AGENT_LOOP = "agentrl"


def _visible_logger() -> logging.Logger:
    """verl sets the root logger to WARNING; this logger prints its INFO lines on stderr anyway."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def registered() -> dict[str, list[str]]:
    """What of this project's is in verl's registries now: ``{"agent_loops", "estimators", "losses"}``."""
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    from agentrl.verl.algorithms import ESTIMATORS, POLICY_LOSSES

    return {"agent_loops": [n for n in (AGENT_LOOP,) if n in _agent_loop_registry],
            "estimators": [n for n in ESTIMATORS if n in ADV_ESTIMATOR_REGISTRY],
            "losses": [n for n in POLICY_LOSSES if n in POLICY_LOSS_REGISTRY]}


def register() -> dict[str, list[str]]:
    """Register everything, check the registries and log the result; raises if something is missing."""
    from verl.experimental.agent_loop.agent_loop import register as register_agent_loop

    from agentrl.verl import algorithms
    from agentrl.verl.agent_loop import AgentrlAgentLoop

    register_agent_loop(AGENT_LOOP)(AgentrlAgentLoop)
    algorithms.register_all()
    found = registered()
    missing = [name for names, kind in ((("agentrl",), "agent_loops"), (algorithms.ESTIMATORS, "estimators"),
                                        (algorithms.POLICY_LOSSES, "losses"))
               for name in names if name not in found[kind]]
    if missing:
        _visible_logger().error("agentrl verl plugin: not registered: %s", ", ".join(missing))
        raise RuntimeError(f"the agentrl verl plugin could not register {', '.join(missing)}")
    _visible_logger().info("registered agent loop %s, estimators %s, policy losses %s", AGENT_LOOP,
                           ", ".join(found["estimators"]), ", ".join(found["losses"]))
    return found


try:
    register()
except Exception:  # verl hides this at DEBUG level; say it where it shows
    _visible_logger().exception("agentrl verl plugin failed to load")
    raise
