"""Which candidate regions to annotate next, and in what order: the four ``--strategy`` choices.

- ``random``: a seeded random draw; the rank is the draw order and there is no score (NaN).
- ``kcenter``: greedy k-center on region features (:mod:`simclr_path.selection.kcenter`), the
  annotated regions as initial centers: diversity, the cold start that needs no model. Score: the
  pick's distance to its nearest annotated or earlier-picked region at the time it was picked.
- ``entropy``: highest mean pixel entropy of a segmentation model's prediction first
  (uncertainty). Score: the region's entropy (``segment``'s per-patch value, 0 = sure,
  1 = uniform guess, averaged over the region's patches).
- ``hybrid``: the ``pool`` most uncertain candidates (default 4 x budget), then k-center among
  them with the annotated regions as initial centers: uncertain and diverse. Score: the entropy.

Annotated regions are never candidates; ties go to the lowest region index.
"""

from __future__ import annotations

import numpy as np
import torch

from simclr_path.errors import SimclrPathError
from simclr_path.selection.kcenter import greedy_kcenter

STRATEGIES = ("random", "kcenter", "entropy", "hybrid")
NEEDS_FEATURES = ("kcenter", "hybrid")
NEEDS_ENTROPY = ("entropy", "hybrid")


def check_budget(budget: int, candidates: int, annotated: int) -> None:
    """A one-line error unless 1 <= ``budget`` <= the number of regions that can be proposed."""
    if budget < 1:
        raise SimclrPathError(f"--budget must be at least 1 region, got {budget}")
    if budget > candidates:
        raise SimclrPathError(f"--budget {budget} is more than the {candidates} regions that can be proposed "
                              f"({annotated} already annotated); lower --budget or use a smaller --region-size")


def hybrid_pool(budget: int, pool: int | None, candidates: int) -> int:
    """How many of the most uncertain candidates ``hybrid`` diversifies among."""
    if pool is not None and pool < budget:
        raise SimclrPathError(f"--pool {pool} is smaller than --budget {budget}; give a --pool of at least the "
                              "budget (default 4 x budget)")
    return min(candidates, 4 * budget if pool is None else pool)


def select_regions(strategy: str, features: torch.Tensor | None, budget: int, annotated_mask: np.ndarray,
                   entropy: np.ndarray | None = None, pool: int | None = None,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``budget`` regions for annotation.

    Args:
        strategy: one of :data:`STRATEGIES`.
        features: (R, D) region features (``kcenter``, ``hybrid``; else unused, may be None).
        budget: number of regions to propose.
        annotated_mask: (R,) bool, True for regions already annotated.
        entropy: (R,) region entropy (``entropy``, ``hybrid``).
        pool: ``hybrid``'s candidate pool size (default 4 x budget, at least budget).
        seed: ``random``'s seed.

    Returns:
        ``(ranked, scores)``: (budget,) int64 region indices, best first, and their float64 scores
        (see the module docstring).
    """
    if strategy not in STRATEGIES:
        raise SimclrPathError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    annotated_mask = np.asarray(annotated_mask, dtype=bool)
    candidates = np.flatnonzero(~annotated_mask)
    check_budget(budget, len(candidates), int(annotated_mask.sum()))
    if strategy in NEEDS_FEATURES and features is None:
        raise ValueError(f"strategy {strategy} needs region features")
    if strategy in NEEDS_ENTROPY:
        if entropy is None:
            raise ValueError(f"strategy {strategy} needs region entropy")
        entropy = np.asarray(entropy, dtype=np.float64)

    if strategy == "random":
        ranked = np.random.default_rng(seed).permutation(candidates)[:budget]
        return ranked.astype(np.int64), np.full(budget, np.nan)
    if strategy == "kcenter":
        return _kcenter(features, candidates, annotated_mask, budget)
    if strategy == "entropy":
        ranked = _most_uncertain_first(entropy, candidates)[:budget]
        return ranked, entropy[ranked]
    ranked, _ = _kcenter(features, hybrid_candidates(entropy, annotated_mask, budget, pool), annotated_mask, budget)
    return ranked, entropy[ranked]


def hybrid_candidates(entropy: np.ndarray, annotated_mask: np.ndarray, budget: int, pool: int | None) -> np.ndarray:
    """Sorted indices of the ``pool`` most uncertain unannotated regions, among which ``hybrid``
    picks by k-center; only these and the annotated regions need features."""
    candidates = np.flatnonzero(~np.asarray(annotated_mask, dtype=bool))
    uncertain = _most_uncertain_first(np.asarray(entropy, dtype=np.float64), candidates)
    return np.sort(uncertain[:hybrid_pool(budget, pool, len(candidates))])


def _most_uncertain_first(entropy: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``candidates`` by decreasing entropy; the sort is stable, so ties go to the lowest index."""
    return candidates[np.argsort(-entropy[candidates], kind="stable")].astype(np.int64)


def _kcenter(features: torch.Tensor, candidates: np.ndarray, annotated_mask: np.ndarray,
             budget: int) -> tuple[np.ndarray, np.ndarray]:
    annotated = np.flatnonzero(annotated_mask)
    initial = features[torch.from_numpy(annotated)] if len(annotated) else None
    pool = features if len(candidates) == len(features) else features[torch.from_numpy(candidates)]  # no copy
    order, distances = greedy_kcenter(pool, budget, initial)
    return candidates[np.asarray(order, dtype=np.int64)], np.asarray(distances, dtype=np.float64)
