"""One guarded optimizer step, shared by the RL update and the SFT warm start."""

from __future__ import annotations

import torch


def clip_and_step(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter],
                  max_grad_norm: float, *separately_clipped: list[torch.nn.Parameter]) -> tuple[float, bool]:
    """Clip the gradients to ``max_grad_norm`` and step, unless their norm is not finite.

    A NaN or inf gradient (an overflow anywhere in the batch) would be written into the weights and
    the optimizer moments for good; that step is skipped instead and the gradients dropped (as
    verl's actor does). A gradient that is zero everywhere (every advantage of the batch zero, no
    other loss term) skips the step too: Adam would still move each weight along its momentum, by
    about two thirds of the previous step's size right after one, and AdamW would decay it, with
    nothing learned. ``separately_clipped`` groups (a value head) get a norm budget of their own, so
    one loss cannot use up the other's. Returns ``(grad_norm of parameters, stepped)``.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    others = [torch.nn.utils.clip_grad_norm_(group, max_grad_norm) for group in separately_clipped]
    norms = [grad_norm, *others]
    if not all(torch.isfinite(norm) for norm in norms) or all(float(norm) == 0.0 for norm in norms):
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), False
    optimizer.step()
    return float(grad_norm), True
