"""A slide group's QC datasets: written the one way ``tile`` and ``ingest`` both write them, and
counted per reason.

What is measured (pen ink, blur, folds) belongs to :mod:`simclr_path.wsi.qc`; this module only stores
it, so the writers of both stages share it without the store importing the slide stage: ``ingest``
takes the measuring as an object (:class:`QCMeasure`) from its caller.

Example::

    flags, stats = measure.flags(scores)      # measure: a QCMeasure, e.g. simclr_path.wsi.qc.PatchQC()
    counts = write_qc(group, scores, flags, measure.score_names, measure.params, stats)
    qc_summary({"slide-1": counts})           # {"total": {"pen": ..., ...}, "slides": {"slide-1": ...}}
"""

from __future__ import annotations

from typing import Protocol

import h5py
import numpy as np

from simclr_path.store.format import DEFAULT_EXCLUDE_QC, QC_REASONS, qc_bit


class QCMeasure(Protocol):
    """What a store writer needs to measure QC (``simclr_path.wsi.qc.PatchQC`` is one).

    ``score_names``: the columns of ``scores``; ``params``: the thresholds, as slide attributes;
    ``scores(rgb)``: one patch's row from its stored HxWx3 uint8 RGB pixels; ``flags(scores)``: the
    (N,) uint8 flags of one slide's (N, K) rows and the slide statistics used.
    """

    score_names: tuple[str, ...]
    params: dict

    def scores(self, rgb: np.ndarray) -> np.ndarray: ...

    def flags(self, scores: np.ndarray) -> tuple[np.ndarray, dict]: ...


def summarise_flags(flags: np.ndarray, exclude=DEFAULT_EXCLUDE_QC) -> dict:
    """Patches per reason (a patch with two reasons counts in both), ``clean`` (no reason) and
    ``excluded`` (any reason in ``exclude``)."""
    flags = np.asarray(flags, dtype=np.uint8)
    out = {reason: int(np.count_nonzero(flags & qc_bit(reason))) for reason in QC_REASONS}
    out["clean"] = int(np.count_nonzero(flags == 0))
    mask = 0
    for reason in exclude:
        mask |= qc_bit(reason)
    out["excluded"] = int(np.count_nonzero(flags & mask))
    return out


def write_qc(group: h5py.Group, scores: np.ndarray, flags: np.ndarray, score_names, params: dict,
             stats: dict | None = None) -> dict:
    """A slide's ``qc_scores`` and ``qc_flags`` datasets, its per-reason counts (``qc_<reason>``),
    the thresholds ``params`` and the slide statistics ``stats`` as attributes; returns the counts.

    ``stats``: reason -> {name: value or None}, stored as ``qc_<reason>_<name>`` (None as NaN).
    """
    names = list(score_names)
    dataset = group.create_dataset("qc_scores", data=np.asarray(scores, np.float32).reshape(-1, len(names)))
    dataset.attrs["names"] = names
    dataset = group.create_dataset("qc_flags", data=np.asarray(flags, np.uint8))
    dataset.attrs["reasons"] = list(QC_REASONS)
    counts = summarise_flags(flags)
    group.attrs.update({f"qc_{key}": value for key, value in counts.items()})
    group.attrs.update(params)
    for reason, values in (stats or {}).items():
        for key, value in values.items():
            group.attrs[f"qc_{reason}_{key}"] = np.nan if value is None else value
    return counts


def qc_summary(per_slide: dict[str, dict]) -> dict:
    """The ``qc`` entry of a writer's JSON summary: the counts summed over slides, and per slide."""
    total: dict[str, int] = {}
    for counts in per_slide.values():
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    return {"total": total, "slides": per_slide}
