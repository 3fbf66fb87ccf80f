"""LARS with SimCLR's parameter groups.

SimCLR (appendix B.1): "LARS optimizer ... excluding batch normalization and bias parameters from
LARS adaptation and weight decay". We use ``timm.optim.Lars``: a group with ``weight_decay=0`` gets
no trust-ratio adaptation (``always_adapt=False``), so one group setting does both exclusions.
"""

from __future__ import annotations

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


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                    trust_coeff: float = 0.001):
    from timm.optim import Lars

    return Lars(param_groups(model, weight_decay), lr=lr, momentum=momentum, trust_coeff=trust_coeff)
