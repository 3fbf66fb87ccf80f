"""The SimCLR model: a timm backbone (pooled features) followed by an MLP projection head."""

from __future__ import annotations

import torch
from torch import nn

from simclr_path.models.backbones import create_backbone
from simclr_path.models.heads import ProjectionHead


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
