"""Small models and fixed batches for comparing gradients (engine and runtime tests)."""

import torch

from simclr_path.models import SimCLRModel

B, SIZE = 6, 32  # patches per rank, image side


def make_model(backbone="resnet18", **kwargs):
    torch.manual_seed(0)
    return SimCLRModel(backbone, head_out=16, **kwargs)


def global_views():
    g = torch.Generator().manual_seed(1)
    view0 = torch.randn(2 * B, 3, SIZE, SIZE, generator=g)
    view1 = torch.randn(2 * B, 3, SIZE, SIZE, generator=g)
    return view0, view1


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def flat(grads, keys):
    return torch.cat([grads[k].flatten() for k in keys])
