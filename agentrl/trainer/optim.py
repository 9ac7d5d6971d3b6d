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


def apply_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                   lrs: list[float], betas: tuple[float, float], weight_decay: float) -> list[str]:
    """Set each parameter group's base learning rate (``lrs``, in group order), betas and weight
    decay after a resume, and its current rate from the schedule at its restored position.

    ``optimizer.load_state_dict`` and ``scheduler.load_state_dict`` bring back the values the run
    was saved with, so a resumed run given another ``trainer.lr`` would go on at the old one while
    its ``config.yaml`` says the new one. Returns what changed, one line per setting, for a warning.
    """
    changes = []
    for index, (group, lr) in enumerate(zip(optimizer.param_groups, lrs, strict=True)):
        saved = {"lr": group.get("initial_lr", group["lr"]), "betas": tuple(group["betas"]),
                 "weight_decay": group["weight_decay"]}
        wanted = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        changes += [f"group {index} {key}: {saved[key]} -> {wanted[key]}" for key in wanted if saved[key] != wanted[key]]
        group["initial_lr"], group["betas"], group["weight_decay"] = lr, tuple(betas), weight_decay
    scheduler.base_lrs = list(lrs)
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return changes
