"""Projection heads.

After SimCLRv2 (Chen et al. 2020b): "a deeper projection head ... 3-layer" MLP; hidden blocks are
Linear -> BatchNorm -> ReLU and the last is Linear -> BatchNorm, as in lightly's
``SimCLRProjectionHead``. Heads are dropped at export: only the backbone is the encoder.
"""

from __future__ import annotations

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
