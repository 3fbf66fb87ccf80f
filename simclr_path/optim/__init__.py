"""Optimisation: LARS (or SGD) with SimCLR's parameter groups, learning-rate scaling and schedule."""

from simclr_path.optim.optimizers import OPTIMIZERS, build_optimizer, is_bias_or_norm, param_groups
from simclr_path.optim.schedule import build_scheduler, scaled_lr

__all__ = ["OPTIMIZERS", "build_optimizer", "build_scheduler", "is_bias_or_norm", "param_groups", "scaled_lr"]
