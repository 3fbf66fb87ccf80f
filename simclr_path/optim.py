"""LARS with SimCLR's parameter groups, and the per-step learning-rate schedule.

SimCLR (appendix B.1): "LARS optimizer ... excluding batch normalization and bias parameters from
LARS adaptation and weight decay". We use ``timm.optim.Lars``: a group with ``weight_decay=0`` gets
no trust-ratio adaptation (``always_adapt=False``), so one group setting does both exclusions.
The schedule is timm's ``CosineLRScheduler`` stepped every optimiser update: linear warm-up from 0,
then cosine decay to 0.
"""

from __future__ import annotations

import math

from torch import nn


def is_bias_or_norm(name: str, param) -> bool:
    """Biases and normalisation weights: every parameter with fewer than two dimensions."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decay + LARS adaptation) and biases/norm parameters (neither)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_bias_or_norm(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "name": "bias_and_norm"},
    ]


def scaled_lr(base_lr: float, global_batch: int, scaling: str) -> float:
    """SimCLR's rules: linear ``base * batch / 256`` or square-root ``base * sqrt(batch)``."""
    if scaling == "linear":
        return base_lr * global_batch / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch)
    raise ValueError(f"lr scaling must be 'linear' or 'sqrt', got {scaling!r}")


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                    trust_coeff: float = 0.001):
    from timm.optim import Lars

    return Lars(param_groups(model, weight_decay), lr=lr, momentum=momentum, trust_coeff=trust_coeff)


def build_scheduler(optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up over ``warmup_steps`` then cosine to zero at ``total_steps`` (per step)."""
    from timm.scheduler import CosineLRScheduler

    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps),
        lr_min=0.0,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
