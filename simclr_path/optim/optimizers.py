"""The pretraining optimiser: LARS (default) or SGD with momentum, with SimCLR's parameter groups.

SimCLR (appendix B.1): "LARS optimizer ... excluding batch normalization and bias parameters from
LARS adaptation and weight decay". We use ``timm.optim.Lars`` with the adaptation set per group:
weights adapt (``always_adapt=True``) whatever their weight decay, biases and norm parameters do not
(``always_adapt=False`` and no decay). timm only adapts a group with ``always_adapt=False`` when its
weight decay is non-zero, so leaving it to the decay would turn the weights into plain SGD at the
LARS learning rate (~5 at batch 256) as soon as ``weight_decay`` is 0.

``sgd`` is ``torch.optim.SGD`` with momentum on the same two groups (weight decay on the weights
only), for comparing the two at small batch. It takes the learning rate as given: a LARS rate
(0.85 for ``small`` at batch 128, 4.8 for ``resnet50_paper`` at 4096) is far too high for it.
"""

from __future__ import annotations

import torch
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
        {"params": decay, "weight_decay": weight_decay, "always_adapt": True, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "always_adapt": False, "name": "bias_and_norm"},
    ]


OPTIMIZERS = ("lars", "sgd")


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                    trust_coeff: float = 0.001, name: str = "lars"):
    """``name``: ``lars`` (timm's ``Lars``, weights adapted) or ``sgd`` (no adaptation, ``trust_coeff`` unused)."""
    if name == "sgd":
        groups = [{k: v for k, v in group.items() if k != "always_adapt"}
                  for group in param_groups(model, weight_decay)]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name != "lars":
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    from timm.optim import Lars

    return Lars(param_groups(model, weight_decay), lr=lr, momentum=momentum, trust_coeff=trust_coeff)
