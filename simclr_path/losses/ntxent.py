"""NT-Xent, the normalised temperature-scaled cross-entropy loss of SimCLR (Chen et al. 2020).

For a batch of N patches with projections of two views, every one of the 2N embeddings is an
anchor. With cosine similarity ``sim`` and temperature ``t``, the loss of anchor ``i`` whose
positive (the other view of the same patch) is ``j``::

    l(i, j) = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

and the loss is the mean of ``l`` over all 2N anchors (the paper's eq. 1, both views as anchors).

Distributed: with ``gather_distributed=True`` each rank's anchors are scored against the embeddings
of *every* rank (2 * N_global - 1 candidates), gathered with
``torch.distributed.nn.functional.all_gather`` so gradients flow back to the rank that produced
each embedding. Each rank returns the mean over its own anchors; DDP's gradient averaging over ranks
then gives exactly the gradient of the global-batch loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32; float32 and float64 stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the autograd graph.

    ``torch.distributed.nn.functional.all_gather``'s backward sums each rank's gradient for a
    tensor back onto the rank that produced it (reduce-scatter on NCCL, all-to-all on gloo).
    """
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of an API without gloo support
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(tensor.contiguous()), dim=0)


class NTXentLoss(nn.Module):
    """NT-Xent loss over two batches of projections.

    Args:
        temperature: softmax temperature (default 0.1, SimCLR's choice for large batches).
        gather_distributed: score anchors against the embeddings of all ranks (default False;
            ignored when torch.distributed is not initialised or has one rank).

    Shapes:
        ``loss(z0, z1)`` with ``z0``, ``z1`` of shape (B, D): the two views of the same B patches,
        row ``i`` of ``z0`` and of ``z1`` a positive pair. Returns a scalar: the mean over 2B anchors.
        The similarities and the softmax run in float32 even under autocast.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.1)
        >>> loss = loss_fn(head(backbone(view0)), head(backbone(view1)))
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        if z0.shape != z1.shape or z0.dim() != 2:
            raise ValueError(f"z0 and z1 must both be (B, D), got {tuple(z0.shape)} and {tuple(z1.shape)}")
        with torch.autocast(device_type=z0.device.type, enabled=False):
            z0 = F.normalize(at_least_fp32(z0), dim=1)
            z1 = F.normalize(at_least_fp32(z1), dim=1)
            batch = z0.shape[0]
            if self.gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                all0, all1 = gather_with_grad(z0), gather_with_grad(z1)
                offset = dist.get_rank() * batch
            else:
                all0, all1, offset = z0, z1, 0
            total = all0.shape[0]  # patches in the global batch
            anchors = torch.cat([z0, z1], dim=0)  # (2B, D): local anchors
            candidates = torch.cat([all0, all1], dim=0)  # (2N, D): view-0 block, then view-1 block
            logits = anchors @ candidates.T / self.temperature
            local = torch.arange(batch, device=z0.device) + offset
            self_index = torch.cat([local, local + total])
            positive = torch.cat([local + total, local])
            rows = torch.arange(2 * batch, device=z0.device)
            logits[rows, self_index] = float("-inf")
            return F.cross_entropy(logits, positive)

    def negatives_per_anchor(self, global_batch: int) -> int:
        """Candidates an anchor is contrasted with, besides its positive: 2N - 2."""
        return 2 * global_batch - 2
