"""Advantage estimators (``advantages``) and policy losses (``losses``): pure functions over tensors."""

from agentrl.algos import advantages, losses

__all__ = ["advantages", "losses"]
