"""Segmentation scores from a confusion matrix: per-class Dice and IoU, pooled over many masks.

Pixels are counted into a C x C matrix (rows: truth, columns: prediction), so scores pooled over a
whole data set are exact (not a mean of per-image scores) and one pass is enough. For class ``c``::

    TP = M[c, c]     FP = sum(M[:, c]) - TP     FN = sum(M[c, :]) - TP
    Dice = 2 TP / (2 TP + FP + FN)      IoU = TP / (TP + FP + FN)

A class absent from both truth and prediction has no score (NaN; ``None`` in :meth:`as_dict`) and
is left out of the means, so an image without tumour neither rewards nor punishes the tumour class.
"""

from __future__ import annotations

import math

import numpy as np


class ConfusionCounter:
    """Accumulates the pixel confusion matrix of predicted vs true class masks.

    Args:
        num_classes: number of classes C; class values are 0 .. C-1.
        ignore_index: truth value of pixels that are not scored (unlabelled), default 255.

    Example::

        counter = ConfusionCounter(2)
        counter.update(pred_mask, truth_mask)   # any shape, same for both
        counter.dice()                          # (C,) float64, NaN for absent classes
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Count the pixels of one prediction (class values) against its truth (class values or ignore)."""
        pred, truth = np.asarray(pred), np.asarray(truth)
        if pred.shape != truth.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
        keep = truth != self.ignore_index
        p = pred[keep].astype(np.int64, copy=False).ravel()
        t = truth[keep].astype(np.int64, copy=False).ravel()
        c = self.num_classes
        if t.size and (t.min() < 0 or t.max() >= c):
            raise ValueError(f"truth holds class values outside 0..{c - 1} (and not {self.ignore_index})")
        if p.size and (p.min() < 0 or p.max() >= c):
            raise ValueError(f"prediction holds class values outside 0..{c - 1}")
        self.matrix += np.bincount(t * c + p, minlength=c * c).reshape(c, c)

    def merge(self, other: "ConfusionCounter") -> None:
        """Add another counter's pixels (same number of classes) to this one."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix

    @property
    def pixels(self) -> int:
        """Number of scored pixels so far."""
        return int(self.matrix.sum())

    def _parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tp = np.diag(self.matrix).astype(np.float64)
        fp = self.matrix.sum(axis=0) - tp
        fn = self.matrix.sum(axis=1) - tp
        return tp, fp, fn

    def dice(self) -> np.ndarray:
        """(C,) Dice per class, 2TP / (2TP + FP + FN); NaN where the class is in neither truth nor prediction."""
        tp, fp, fn = self._parts()
        denominator = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, 2 * tp / denominator, np.nan)

    def iou(self) -> np.ndarray:
        """(C,) intersection over union per class, TP / (TP + FP + FN); NaN where the class is absent."""
        tp, fp, fn = self._parts()
        denominator = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, tp / denominator, np.nan)

    def as_dict(self, classes: list[str]) -> dict:
        """JSON-ready scores: ``dice`` and ``iou`` by class name (None when absent); the headline
        ``mean_dice``/``mean_iou`` over the *foreground* classes present (every class but class 0,
        background, whose large easy area would flatter any model; None when none is present);
        ``background_dice``/``background_iou`` beside them; and the number of scored ``pixels``."""
        if len(classes) != self.num_classes:
            raise ValueError(f"{len(classes)} class names for {self.num_classes} classes")
        dice, iou = self.dice(), self.iou()
        foreground = slice(1, None) if self.num_classes > 1 else slice(None)
        return {
            "dice": {name: _number(v) for name, v in zip(classes, dice)},
            "iou": {name: _number(v) for name, v in zip(classes, iou)},
            "mean_dice": nan_mean(dice[foreground]),
            "mean_iou": nan_mean(iou[foreground]),
            "background_dice": _number(dice[0]),
            "background_iou": _number(iou[0]),
            "pixels": self.pixels,
        }


def nan_mean(values) -> float | None:
    """Mean of the finite values (None when there are none): the mean over classes or images that have a score."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else None


def _number(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
