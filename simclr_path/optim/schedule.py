"""Learning rate: SimCLR's batch-size scaling rules and the per-step warm-up + cosine schedule.

The schedule is timm's ``CosineLRScheduler`` stepped every optimiser update: linear warm-up from 0,
then cosine decay to 0.
"""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int, scaling: str) -> float:
    """SimCLR's rules: linear ``base * batch / 256`` or square-root ``base * sqrt(batch)``."""
    if scaling == "linear":
        return base_lr * global_batch / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch)
    raise ValueError(f"lr scaling must be 'linear' or 'sqrt', got {scaling!r}")


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
