"""SimCLR model: a timm backbone (pooled features) and an MLP projection head.

Projection head after SimCLRv2 (Chen et al. 2020b): "a deeper projection head ... 3-layer" MLP;
hidden blocks are Linear -> BatchNorm -> ReLU and the last is Linear -> BatchNorm, as in lightly's
``SimCLRProjectionHead``. Only the backbone is exported.
"""

from __future__ import annotations

import difflib
import os

import torch
from torch import nn

from simclr_path.errors import SimclrPathError


class ProjectionHead(nn.Sequential):
    """MLP projection head.

    Args:
        in_dim: backbone feature size.
        hidden_dim: width of the hidden layers (default 2048).
        out_dim: projection size (default 128).
        num_layers: number of Linear layers (default 3, SimCLRv2; SimCLRv1 used 2).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 3):
        if num_layers < 1:
            raise SimclrPathError(f"head layers must be >= 1, got {num_layers}")
        blocks: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == num_layers - 1
            blocks += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b)]
            if not last:
                blocks.append(nn.ReLU(inplace=True))
        super().__init__(*blocks)


def check_backbone_name(name: str) -> None:
    """Raise a one-line error naming close timm models when ``name`` is not one."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise SimclrPathError(f"--backbone {name!r} is not a timm model{hint}")


def create_backbone(name: str, pretrained: str | None = None, **kwargs) -> nn.Module:
    """A timm model with its classifier removed (``num_classes=0``: pooled features).

    ``pretrained`` is a local weights file (.pth, .bin, .safetensors); nothing is downloaded.
    """
    import timm

    check_backbone_name(name)
    if pretrained:
        if not os.path.isfile(pretrained):
            raise SimclrPathError(f"{pretrained}: --pretrained weights file not found (only local files are used)")
        try:
            return timm.create_model(name, pretrained=True, num_classes=0,
                                     pretrained_cfg_overlay={"file": os.path.abspath(pretrained)}, **kwargs)
        except Exception as exc:
            raise SimclrPathError(
                f"{pretrained}: cannot load into {name} ({str(exc).splitlines()[0][:200]}); "
                "check the file matches the backbone"
            ) from None
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


class SimCLRModel(nn.Module):
    """Backbone + projection head; ``forward(x)`` returns projections (B, out_dim).

    Args:
        backbone: timm model name, e.g. ``resnet50``.
        pretrained: optional local weights file for the backbone.
        head_hidden: hidden width of the head (default: the backbone's feature size, as in SimCLR).
        head_out: projection size (default 128).
        head_layers: depth of the head (default 3).
        backbone_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """

    def __init__(self, backbone: str, pretrained: str | None = None, head_hidden: int | None = None,
                 head_out: int = 128, head_layers: int = 3, **backbone_kwargs):
        super().__init__()
        self.backbone_name = backbone
        self.backbone = create_backbone(backbone, pretrained, **backbone_kwargs)
        features = self.backbone.num_features
        self.head = ProjectionHead(features, head_hidden or features, head_out, head_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
