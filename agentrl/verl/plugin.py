"""The ``verl.plugins`` entry point: ``import verl`` imports this module in every verl process.

Importing it registers the ``agentrl`` agent loop (read by verl's agent-loop workers), the
estimators and the ``agentrl_*`` trainers (read by the TaskRunner; the trainers only where verl's
v1 trainer imports, i.e. with ``TransferQueue`` installed) and the policy losses (read by the actor
workers), then checks that each landed in verl's registry and says so at INFO on stderr. verl swallows a plugin's import
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
    """What of this project's is in verl's registries now: ``{"agent_loops", "estimators", "losses",
    "trainers"}``."""
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    from agentrl.verl.algorithms import ESTIMATORS, POLICY_LOSSES

    return {"agent_loops": [n for n in (AGENT_LOOP,) if n in _agent_loop_registry],
            "estimators": [n for n in ESTIMATORS if n in ADV_ESTIMATOR_REGISTRY],
            "losses": [n for n in POLICY_LOSSES if n in POLICY_LOSS_REGISTRY],
            "trainers": _registered_trainers()}


def _registered_trainers() -> list[str]:
    if "agentrl.verl.trainer" not in sys.modules:
        return []
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    from agentrl.verl.trainer import TRAINERS

    return [n for n in TRAINERS if n in TRAINER_REGISTRY]


def _register_trainers() -> str | None:
    """Register the trainers; the reason when verl's v1 trainer does not import here."""
    try:
        import agentrl.verl.trainer  # noqa: F401  (registers on import)
    except ImportError as error:
        return f"trainers not registered: verl's v1 trainer does not import ({error})"
    return None


def register() -> dict[str, list[str]]:
    """Register everything, check the registries and log the result; raises if something is missing."""
    from verl.experimental.agent_loop.agent_loop import register as register_agent_loop

    from agentrl.verl import algorithms
    from agentrl.verl.agent_loop import AgentrlAgentLoop

    register_agent_loop(AGENT_LOOP)(AgentrlAgentLoop)
    algorithms.register_all()
    no_trainers = _register_trainers()
    found = registered()
    missing = [name for names, kind in ((("agentrl",), "agent_loops"), (algorithms.ESTIMATORS, "estimators"),
                                        (algorithms.POLICY_LOSSES, "losses"))
               for name in names if name not in found[kind]]
    if missing:
        _visible_logger().error("agentrl verl plugin: not registered: %s", ", ".join(missing))
        raise RuntimeError(f"the agentrl verl plugin could not register {', '.join(missing)}")
    _visible_logger().info("registered agent loop %s, estimators %s, policy losses %s, trainers %s", AGENT_LOOP,
                           ", ".join(found["estimators"]), ", ".join(found["losses"]),
                           ", ".join(found["trainers"]) or f"none ({no_trainers})")
    return found


try:
    register()
except Exception:  # verl hides this at DEBUG level; say it where it shows
    _visible_logger().exception("agentrl verl plugin failed to load")
    raise
