"""Tissue QC while tiling: pen ink, blur and folds, measured on each patch's pixels (CPU, OpenCV).

Two steps, because blur and folds are judged against the slide itself:

1. :func:`batch_scores`, in the tiling workers, on each patch's RGB pixels at the target
   resolution (the pixels that are stored), a task's patches at a time: three numbers per patch,
   :data:`SCORE_NAMES` (:func:`patch_scores` for one patch).
2. :func:`slide_flags`, in the tiling process once a slide's patches are all measured and before
   the slide is committed: a bitmask per patch over :data:`~simclr_path.store.format.QC_REASONS`.

The scores:

- ``pen_fraction``: fraction of the patch covered by ink, on a 64 x 64 view of it (area
  interpolation) after a 3 x 3 morphological opening, so isolated pixels (a chromatic fringe at a
  nucleus edge) never count. A pixel is ink when its colour is one no H&E stain takes
  (:func:`ink_mask`): blue ink is bluer than haematoxylin with green at least red's level
  (haematoxylin is purple: red well above green); green ink has green above red and blue; red ink
  is red with green and blue both far below and not pinker than orange-red (eosin and red blood
  cells keep blue well above green); black ink is dark and neutral (dark nuclei stay blue-purple).
  Ink lying on glass counts too: the saturation tissue mask takes ink for tissue.
- ``sharpness``: summed absolute Laplacian over summed Sobel gradient magnitude (both 3 x 3, on
  grey levels of the full patch), over tissue pixels only (HSV saturation > 20 on the 64 x 64
  view, eroded by one view pixel so the tissue-glass border does not count), per quadrant of the
  patch, averaged over the less sharp half of the quadrants with at least 5% tissue (so a patch
  half inside a blurred region reads as blurred); NaN with no such quadrant. The second derivative
  over the first is about one over the width of an edge: blur widens edges, while contrast and
  how much structure a patch holds (smooth epithelium, busy stroma) cancel out. On the two public
  H&E slides its robust spread is 4-9% of the median, where the variance of the Laplacian's is
  40-50% (that measure lost 5% of CMU-1's clean patches, smooth epithelium, at a z-score of 3).
- ``optical_density``: median over the eroded tissue pixels of the 64 x 64 view of the summed
  optical density ``-log10((RGB + 1) / 256)``; a fold (tissue lying on itself) doubles the
  absorbing layer.

A patch is flagged ``pen`` when ``pen_fraction >= pen_min_fraction``. ``blur`` and ``fold`` are
relative to the slide's own distribution, so a soft scanner or a densely stained slide is not a
slide of artefacts. On log10 scores of the slide's non-pen patches: the median ``m``, and a robust
spread ``s``, 1.4826 x the median distance to ``m`` of the scores on the side away from the
artefacts (above ``m`` for sharpness, below it for density), so a long tail of blurred patches
does not widen it. A patch is ``blur`` when its log sharpness is below
``m - max(blur_z x s, log10(blur_min_ratio))``, ``fold`` when its log density is above
``m + max(fold_z x s, log10(fold_min_ratio))``. The ratio floors keep a very uniform slide (tiny
spread) from losing its ordinary patches: a patch must be at least that many times less sharp (or
denser) than the slide's median patch. ``m`` and ``s`` are estimated :data:`REJECTION_ROUNDS`
times, each time without the patches the previous round flagged, so a slide that is one third
blurred still has the median of its sharp part (``bench/qc.py``'s slides are a quarter to a third
blurred); a slide mostly out of focus is beyond any measure relative to the slide itself. Slides
with fewer than :data:`MIN_PATCHES_FOR_STATS` measured patches get no ``blur`` or ``fold`` flags.

Bubbles and debris are not detected (not attempted yet).

Example::

    scores = batch_scores(patches)                          # (N, 3) float32
    flags = slide_flags(scores)                             # (N,) uint8, bit i = QC_REASONS[i]
    summarise_flags(flags)                                  # {"pen": 3, "blur": 1, "fold": 0, ...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from simclr_path.store.format import qc_bit
from simclr_path.store.qc import summarise_flags

__all__ = ["SCORE_NAMES", "PatchQC", "QCParams", "batch_scores", "ink_mask", "patch_scores", "slide_flags", "summarise_flags"]

#: Columns of ``qc_scores``, in order.
SCORE_NAMES = ("pen_fraction", "sharpness", "optical_density")
#: Side of the view the ink colour rules run on (pixels).
INK_VIEW = 64
#: Rounds of median/MAD estimation, each without the patches the previous round flagged: a slide
#: with a large artefact has its median pulled towards it, and its first threshold is too lenient.
REJECTION_ROUNDS = 3
#: Below this many measured patches a slide's median and spread are not trusted: no blur or fold flags.
MIN_PATCHES_FOR_STATS = 8
#: Patches measured as one stack by :func:`batch_scores` (larger batches are split).
BATCH = 32


@dataclass(frozen=True)
class QCParams:
    """QC thresholds.

    Args:
        pen_min_fraction: a patch with at least this fraction of ink is ``pen`` (default 0.02).
        blur_z: robust z-score below the slide's median log sharpness that is ``blur`` (default 5).
        blur_min_ratio: and at least this many times less sharp than the median patch (default 1.3).
        fold_z: robust z-score above the slide's median log optical density that is ``fold`` (default 4).
        fold_min_ratio: and at least this many times denser than the median patch (default 1.35).
        min_tissue_pixels: fraction of tissue pixels below which sharpness and density are NaN
            (not judged; default 0.05).
    """

    pen_min_fraction: float = 0.02
    blur_z: float = 5.0
    blur_min_ratio: float = 1.3
    fold_z: float = 4.0
    fold_min_ratio: float = 1.35
    min_tissue_pixels: float = 0.05

    def as_attrs(self) -> dict:
        return {f"qc_{k}": v for k, v in self.__dict__.items()}


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """uint8 0/1 mask of pixels whose colour is pen ink (blue, green, red or black) of an RGB image.

    The rules, on 0-255 channels: blue ``B-R > 45, B-G > 25, G-R > -15``; green ``G-R > 20,
    G-B > -5``; red ``R-G > 90, R-B > 70, G < 0.3 R, B < 0.45 R`` (red blood cells keep
    ``G/R`` near 0.37, ``B/R`` above 0.5); black ``max < 100, max-min < 30``. On the two public
    H&E slides no 128 px patch at 0.5 um/px with 30% tissue, at any quarter-patch offset, has
    more than 1.4% of such pixels after the opening :func:`patch_scores` applies (the ``pen``
    threshold is 2%).
    """
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    high = np.maximum(np.maximum(r, g), b)
    low = np.minimum(np.minimum(r, g), b)
    blue = (b - r > 45) & (b - g > 25) & (g - r > -15)
    green = (g - r > 20) & (g - b > -5)
    red = (r - g > 90) & (r - b > 70) & (10 * g < 3 * r) & (20 * b < 9 * r)
    black = (high < 100) & (high - low < 30)
    return (blue | green | red | black).astype(np.uint8)


_OPEN = np.ones((3, 3), np.uint8)
#: Optical density of each level 0-255 (a lookup table for cv2.LUT), summed over channels later.
_OD_LUT = (-np.log10((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32).reshape(1, 256)
_CHANNEL_SUM = np.ones((1, 3), np.float32)  # cv2.transform: R + G + B


def patch_scores(rgb: np.ndarray, params: QCParams = QCParams()) -> np.ndarray:
    """``(pen_fraction, sharpness, optical_density)`` of one HxWx3 uint8 RGB patch, float32."""
    return batch_scores([rgb], params)[0]


def batch_scores(patches, params: QCParams = QCParams()) -> np.ndarray:
    """QC scores (:data:`SCORE_NAMES`, see the module docstring) of each of ``patches`` (HxWx3 uint8 RGB,
    all of one side), as an (N, 3) float32 array.

    Colour work (ink, tissue, density) runs on the 64 x 64 view; the derivatives on the full patch,
    averaged down to the view's grid so tissue is selected there. The patches are processed as one
    stack (each OpenCV call runs once per batch, neighbourhood operations on patches padded apart
    as OpenCV pads a lone image), so a patch's scores do not depend on what else is in the batch.
    About 0.1 ms per 128 px patch and 0.3 ms per 256 px patch on one core of this project's shared
    2-core machine, in batches of a tiling task.
    """
    if len(patches) > BATCH:  # stacks that stay in cache
        return np.concatenate([batch_scores(patches[i : i + BATCH], params) for i in range(0, len(patches), BATCH)])
    n = len(patches)
    if n == 0:
        return np.zeros((0, len(SCORE_NAMES)), np.float32)
    side = patches[0].shape[0]
    full = np.stack(patches) if side % INK_VIEW == 0 else None
    if full is not None:  # whole blocks: one area resize of the stacked patches is each patch's own
        small = cv2.resize(full.reshape(n * side, side, 3), (INK_VIEW, n * INK_VIEW), interpolation=cv2.INTER_AREA)
    else:
        small = np.concatenate([cv2.resize(p, (INK_VIEW, INK_VIEW), interpolation=cv2.INTER_AREA) for p in patches])
    small = small.reshape(n, INK_VIEW, INK_VIEW, 3)

    pen = _opened(ink_mask(small)).reshape(n, -1).mean(axis=1, dtype=np.float64)
    saturation = cv2.cvtColor(small.reshape(n * INK_VIEW, INK_VIEW, 3), cv2.COLOR_RGB2HSV)[..., 1]
    tissue = _eroded((saturation > 20).astype(np.uint8).reshape(n, INK_VIEW, INK_VIEW))  # off the glass border
    judged = tissue.reshape(n, -1).mean(axis=1) >= params.min_tissue_pixels
    out = np.full((n, len(SCORE_NAMES)), np.nan, np.float32)
    out[:, 0] = pen
    if not judged.any():
        return out
    index = np.flatnonzero(judged)
    tissue = tissue[index]
    density = cv2.transform(cv2.LUT(small[index].reshape(-1, INK_VIEW, 3), _OD_LUT), _CHANNEL_SUM)
    density = np.where(tissue.reshape(len(index), -1) > 0, density.reshape(len(index), -1), np.inf)
    counts = np.count_nonzero(tissue.reshape(len(index), -1), axis=1)
    out[index, 2] = np.sort(density, axis=1)[np.arange(len(index)), counts // 2]  # the upper median
    laplacian, gradient = _derivatives([patches[i] for i in index], side)
    tissue = tissue.astype(np.float32)
    out[index, 1] = _least_sharp_half(laplacian * tissue, gradient * tissue, tissue, params.min_tissue_pixels)
    return out


def _stack_apart(images: np.ndarray, fill: int) -> tuple[np.ndarray, int]:
    """(N, h, w) images as one (N * (h + 1), w) image, each followed by a row of ``fill``."""
    n, h, w = images.shape
    stacked = np.full((n, h + 1, w), fill, images.dtype)
    stacked[:, :h] = images
    return stacked.reshape(n * (h + 1), w), h


def _unstack(stacked: np.ndarray, n: int, h: int) -> np.ndarray:
    return stacked.reshape(n, h + 1, -1)[:, :h]


def _eroded(masks: np.ndarray) -> np.ndarray:
    """3 x 3 erosion of each (N, h, w) 0/1 mask, as ``cv2.erode`` of that mask alone (outside: no effect)."""
    stacked, h = _stack_apart(masks, 1)
    return _unstack(cv2.erode(stacked, _OPEN), len(masks), h)


def _opened(masks: np.ndarray) -> np.ndarray:
    """3 x 3 opening of each (N, h, w) 0/1 mask, as ``cv2.morphologyEx(MORPH_OPEN)`` of it alone."""
    eroded = _eroded(masks)
    stacked, h = _stack_apart(eroded, 0)
    return _unstack(cv2.dilate(stacked, _OPEN), len(masks), h)


def _derivatives(patches: list[np.ndarray], side: int) -> tuple[np.ndarray, np.ndarray]:
    """|Laplacian| and Sobel gradient magnitude (3 x 3, grey levels) of each patch, area-averaged to
    the 64 x 64 view: (N, 64, 64) float32 each. Patches are padded apart by their own reflection
    (OpenCV's default border), so each equals the derivative of that patch alone."""
    n = len(patches)
    grey = cv2.cvtColor(np.concatenate(patches), cv2.COLOR_RGB2GRAY).reshape(n, side, side)
    padded = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="reflect").reshape(n * (side + 2), side + 2)
    # Integer kernels on 8-bit levels: exact in int16, and much faster there than in float32.
    laplacian = np.abs(cv2.Laplacian(padded, cv2.CV_16S, ksize=3)).astype(np.float32)
    dx, dy = cv2.spatialGradient(padded)  # the 3 x 3 Sobel pair
    gradient = cv2.magnitude(dx.astype(np.float32), dy.astype(np.float32))
    views = []
    for values in (laplacian, gradient):
        inner = values.reshape(n, side + 2, side + 2)[:, 1:-1, 1:-1]
        if side % INK_VIEW == 0:
            view = cv2.resize(np.ascontiguousarray(inner).reshape(n * side, side), (INK_VIEW, n * INK_VIEW),
                              interpolation=cv2.INTER_AREA)
        else:
            view = np.concatenate([cv2.resize(v, (INK_VIEW, INK_VIEW), interpolation=cv2.INTER_AREA) for v in inner])
        views.append(view.reshape(n, INK_VIEW, INK_VIEW))
    return views[0], views[1]


def _quadrant_sums(values: np.ndarray) -> np.ndarray:
    """Sums of (N, s, s) ``values`` over the four quadrants of each square of even side: (N, 4)."""
    n, half = len(values), values.shape[1] // 2
    return values.reshape(n, 2, half, 2, half).sum(axis=(2, 4)).reshape(n, 4)


def _least_sharp_half(laplacian: np.ndarray, gradient: np.ndarray, tissue: np.ndarray, min_tissue: float) -> np.ndarray:
    """Per patch, summed |Laplacian| over summed gradient (both already zero off tissue) in each
    quadrant with enough tissue, averaged over the less sharp half of those quadrants (NaN with
    none): a patch half in a blurred region scores as blurred."""
    area = tissue[0].size / 4
    counts = _quadrant_sums(tissue)
    lap, grad = _quadrant_sums(laplacian), _quadrant_sums(gradient)
    usable = (counts >= min_tissue * area) & (grad > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.sort(np.where(usable, lap / np.where(usable, grad, 1), np.inf), axis=1)
    kept = np.maximum(1, usable.sum(axis=1) // 2)
    taken = np.arange(4)[None, :] < kept[:, None]
    sharpness = np.where(taken, ratios, 0).sum(axis=1) / kept
    return np.where(usable.any(axis=1), sharpness, np.nan)


def _robust(values: np.ndarray, sign: int) -> tuple[float, float]:
    """Median of the finite ``values`` and the robust spread of its clean side (NaN, 0 when too few).

    The spread is 1.4826 x the median distance to the median of the values on the side away from
    the artefacts (above it for blur, ``sign`` -1; below it for folds, +1): a slide with a large
    blurred region has a long low tail, which would widen a two-sided MAD until the blur hides
    inside it.
    """
    values = values[np.isfinite(values)]
    if len(values) < MIN_PATCHES_FOR_STATS:
        return math.nan, 0.0
    median = float(np.median(values))
    clean_side = values[values >= median] if sign < 0 else values[values <= median]
    return median, 1.4826 * float(np.median(np.abs(clean_side - median)))


def slide_flags(scores: np.ndarray, params: QCParams = QCParams()) -> tuple[np.ndarray, dict]:
    """Flags of one slide's patches from their :func:`patch_scores` rows, and the slide statistics.

    Returns ``(flags, stats)``: ``flags`` (N,) uint8, bit ``qc_bit(reason)`` set per reason;
    ``stats`` the medians and thresholds used (in score units), for the QC report.
    """
    scores = np.asarray(scores, dtype=np.float32).reshape(-1, len(SCORE_NAMES))
    flags = np.zeros(len(scores), dtype=np.uint8)
    pen = scores[:, 0] >= params.pen_min_fraction
    flags[pen] |= qc_bit("pen")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_sharp = np.log10(np.maximum(scores[:, 1], 1e-6))
        log_density = np.log10(np.maximum(scores[:, 2], 1e-6))
    log_sharp[~np.isfinite(scores[:, 1])] = np.nan
    log_density[~np.isfinite(scores[:, 2])] = np.nan
    stats = {}
    for reason, values, z, ratio, sign in (("blur", log_sharp, params.blur_z, params.blur_min_ratio, -1),
                                           ("fold", log_density, params.fold_z, params.fold_min_ratio, 1)):
        hit = np.zeros(len(values), dtype=bool)
        median = threshold = math.nan
        for _ in range(REJECTION_ROUNDS):  # statistics of the patches not (yet) taken for artefacts
            centre, spread = _robust(values[~pen & ~hit], sign)
            if math.isnan(centre):  # too few left: keep the previous round's decision
                break
            median, threshold = centre, centre + sign * max(z * spread, math.log10(ratio))
            with np.errstate(invalid="ignore"):
                hit = values < threshold if sign < 0 else values > threshold
        if math.isnan(median):
            stats[reason] = {"median": None, "threshold": None}
            continue
        if reason == "fold":
            hit &= ~pen  # ink is dense too: a pen patch is not also a fold
        flags[hit & np.isfinite(values)] |= qc_bit(reason)
        stats[reason] = {"median": round(10 ** median, 4), "threshold": round(10 ** threshold, 4)}
    return flags, stats


@dataclass(frozen=True)
class PatchQC:
    """This module's QC as one object, for a store writer that measures as it writes (``simclr-path
    ingest --qc on``; it is a :class:`~simclr_path.store.qc.QCMeasure`, which the store stage takes
    without importing this one).

    Args:
        thresholds: the :class:`QCParams` to measure and flag with (default: the defaults).

    Example::

        qc = PatchQC()
        scores = np.stack([qc.scores(p) for p in patches])
        flags, stats = qc.flags(scores)
    """

    thresholds: QCParams = QCParams()
    score_names: tuple[str, ...] = SCORE_NAMES

    @property
    def params(self) -> dict:
        """The thresholds as slide attributes (``qc_pen_min_fraction``, ...)."""
        return self.thresholds.as_attrs()

    def scores(self, rgb: np.ndarray) -> np.ndarray:
        return patch_scores(rgb, self.thresholds)

    def flags(self, scores: np.ndarray) -> tuple[np.ndarray, dict]:
        return slide_flags(scores, self.thresholds)
