"""Greedy k-center (the "coreset" selection of Sener & Savarese, ICLR 2018, Algorithm 1).

"Choose ... the point that is farthest from its nearest center, add it to the centers, repeat":
each pick is the candidate whose Euclidean distance to its nearest center (already-annotated
points, then earlier picks) is largest, which covers feature space with as few picks as possible.

Incremental, so it scales to millions of points: one (N,) vector holds each point's distance to
its nearest center and is updated with each new center, chunk by chunk: O(N * D) work and O(N)
extra memory per pick, never an N x N matrix. Squared distances come from
``|x|^2 + |c|^2 - 2 x.c`` (one fused matrix-vector product per chunk); the square root is taken
only for the distances reported.
"""

from __future__ import annotations

import torch

#: Largest number of distances held at once while measuring the initial centers (64 Mi floats).
_BLOCK_ELEMENTS = 1 << 24


def greedy_kcenter(features: torch.Tensor, budget: int, initial_centers: torch.Tensor | None = None, *,
                   chunk: int = 65536) -> tuple[list[int], list[float]]:
    """Pick ``budget`` rows of ``features`` by greedy k-center.

    Args:
        features: (N, D) candidate points (any float dtype, any device).
        budget: number of picks, 1 <= budget <= N.
        initial_centers: (M, D) points already covered (annotated); never picked, they only push
            picks away from themselves.
        chunk: rows processed at once (bounds temporary memory).

    Returns:
        ``(order, distances)``: the picked row indices in pick order, and each pick's distance to
        its nearest center at the time it was picked. With no initial centers the first pick is
        the point farthest from the mean of all points (deterministic), and its "distance" is that
        distance to the mean. Ties go to the lowest index.
    """
    n = features.shape[0]
    if not 1 <= budget <= n:
        raise ValueError(f"budget must be in 1..{n}, got {budget}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    squared = _squared_norms(features, chunk)
    # ``nearest`` holds squared distances (same order as distances; the square root only for reporting)
    if initial_centers is not None and len(initial_centers):
        nearest = _squared_distances_to_centers(features, squared, initial_centers.to(features), chunk)
    else:
        mean = _mean(features, chunk).to(features.dtype)
        nearest = _update(torch.full_like(squared, float("inf")), features, squared, mean, chunk)
    order, distances = [], []
    for _ in range(budget):
        pick = int(torch.argmax(nearest))  # the first maximal index: ties go to the lowest index
        order.append(pick)
        distances.append(max(float(nearest[pick]), 0.0) ** 0.5)
        _update(nearest, features, squared, features[pick], chunk)
        nearest[pick] = -1.0  # picked: never again, even when every other point is a duplicate of it
    return order, distances


def _squared_norms(features: torch.Tensor, chunk: int) -> torch.Tensor:
    out = torch.empty(features.shape[0], dtype=features.dtype, device=features.device)
    for start in range(0, features.shape[0], chunk):
        block = features[start:start + chunk]
        out[start:start + chunk] = (block * block).sum(dim=1)
    return out


def _mean(features: torch.Tensor, chunk: int) -> torch.Tensor:
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    for start in range(0, features.shape[0], chunk):
        total += features[start:start + chunk].sum(dim=0, dtype=torch.float64)
    return total / features.shape[0]


def _update(nearest: torch.Tensor, features: torch.Tensor, squared: torch.Tensor, center: torch.Tensor,
            chunk: int) -> torch.Tensor:
    """``nearest = min(nearest, |features - center|^2)``, in place, chunk by chunk (two passes over
    each chunk of ``nearest`` besides the matrix-vector product: few, large operations)."""
    center_squared = float((center * center).sum())
    for start in range(0, features.shape[0], chunk):
        stop = start + chunk
        d2 = torch.addmv(squared[start:stop], features[start:stop], center, alpha=-2).add_(center_squared)
        torch.minimum(nearest[start:stop], d2, out=nearest[start:stop])
    return nearest


def _squared_distances_to_centers(features: torch.Tensor, squared: torch.Tensor, centers: torch.Tensor,
                                  chunk: int) -> torch.Tensor:
    """Each row's squared distance to its nearest row of ``centers``, in blocks of rows x centers."""
    nearest = torch.full_like(squared, float("inf"))
    center_block = min(len(centers), 4096)
    rows = max(1, min(chunk, _BLOCK_ELEMENTS // center_block))
    for c_start in range(0, len(centers), center_block):
        block = centers[c_start:c_start + center_block]
        block_squared = (block * block).sum(dim=1)
        for start in range(0, features.shape[0], rows):
            stop = start + rows
            d2 = torch.addmm(block_squared[None, :], features[start:stop], block.T, alpha=-2)
            closest = d2.min(dim=1).values.add_(squared[start:stop])
            torch.minimum(nearest[start:stop], closest, out=nearest[start:stop])
    return nearest
