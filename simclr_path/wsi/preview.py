"""Tiling previews: one PNG per slide to judge tissue detection and the kept patches by eye.

The preview is drawn at a readable size whatever the slide (long side :data:`PREVIEW_LONG_SIDE`
pixels, or the slide's own size when smaller), read from the pyramid in strips as the tissue
thumbnail is, so memory stays flat for any slide. It shows the tissue outline (green), each kept
patch (blue) and a one-line legend: slide, resolution, patches kept. With QC flags, a flagged patch
is drawn in its reason's colour (:data:`QC_COLOURS`; the first reason in
:data:`~simclr_path.store.format.QC_REASONS` order when it has several) and a second legend line
gives each colour, its reason and its patch count.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from simclr_path.errors import SlideError
from simclr_path.store.format import QC_REASONS, qc_bit
from simclr_path.wsi.tissue import thumbnail

#: Long side of a preview in pixels.
PREVIEW_LONG_SIDE = 1800
_GREEN, _BLUE, _INK = (0, 170, 0), (255, 90, 0), (30, 30, 30)  # BGR
#: Box colour (BGR) of a patch flagged for each QC reason.
QC_COLOURS = {"pen": (255, 0, 255), "blur": (0, 165, 255), "fold": (0, 0, 220)}


def preview_downsample(level0_size: tuple[int, int], long_side: int = PREVIEW_LONG_SIDE) -> float:
    """Level-0 pixels per preview pixel: the long side becomes ``long_side`` (never enlarged)."""
    return max(1.0, max(level0_size) / long_side)


def legend_text(name: str, level0_mpp: float | None, target_mpp: float, patch_size: int, kept: int,
                grid_total: int) -> str:
    """``slide | level-0 mpp -> patch mpp | kept / grid patches`` as one line."""
    slide_mpp = "unknown" if level0_mpp is None or math.isnan(level0_mpp) else f"{level0_mpp:.3g}"
    patch_mpp = "unknown" if target_mpp is None or math.isnan(target_mpp) else f"{target_mpp:.3g}"
    return (f"{name} | slide {slide_mpp} um/px, patches {patch_size} px at {patch_mpp} um/px | "
            f"{kept} of {grid_total} patches kept (green: tissue, blue: patches)")


def qc_legend_items(flags: np.ndarray, excluded=()) -> list[tuple[str, tuple[int, int, int]]]:
    """``(text, BGR colour)`` of each QC reason for the legend: ``"pen (excluded): 12"``."""
    flags = np.asarray(flags, dtype=np.uint8)
    return [(f"{reason}{' (excluded)' if reason in excluded else ''}: {int(np.count_nonzero(flags & qc_bit(reason)))}",
             QC_COLOURS[reason]) for reason in QC_REASONS]


def draw_preview(rgb: np.ndarray, downsample: float, mask: np.ndarray, coords: np.ndarray, patch_size_level0: int,
                 legend: str, flags: np.ndarray | None = None, excluded=()) -> np.ndarray:
    """BGR image: ``rgb`` (the slide at ``downsample``) with tissue outline, patches and a legend band.

    ``mask`` is the tissue mask at any resolution (resized here); ``coords`` are level-0 top-left
    corners of the kept patches; ``flags`` their QC bitmask (None: no QC), ``excluded`` the reasons
    excluded by default (said in the legend).
    """
    h, w = rgb.shape[:2]
    canvas = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    outline = (cv2.resize(mask.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_LINEAR) > 127).astype(np.uint8)
    contours, _ = cv2.findContours(outline, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, _GREEN, 2)
    side = patch_size_level0 / downsample
    colours = [_BLUE] * len(coords)
    if flags is not None:
        for reason in reversed(QC_REASONS):  # the first reason wins
            for i in np.flatnonzero(np.asarray(flags) & qc_bit(reason)):
                colours[i] = QC_COLOURS[reason]
    order = np.argsort([c != _BLUE for c in colours], kind="stable")  # flagged boxes drawn last, on top
    for i in order:
        x0, y0 = int(coords[i][0] / downsample), int(coords[i][1] / downsample)
        thick = 1 if colours[i] == _BLUE else 2
        cv2.rectangle(canvas, (x0, y0), (int(x0 + side) - 1, int(y0 + side) - 1), colours[i], thick)
    scale = max(0.45, min(1.0, w / 1800))
    (tw, th), base = cv2.getTextSize(legend, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    fit = min(1.0, (w - 16) / max(tw, 1))  # a long slide name must still fit in one line
    line = int((th + base) * fit) + 16
    items = qc_legend_items(flags, excluded) if flags is not None else []
    band = line * (2 if items else 1)
    out = np.full((h + band, w, 3), 255, np.uint8)
    out[:h] = canvas
    cv2.putText(out, legend, (8, h + line - base - 8), cv2.FONT_HERSHEY_SIMPLEX, scale * fit, _INK, 1, cv2.LINE_AA)
    x, y = 8, h + 2 * line - base - 8
    box = max(6, int(th * fit))
    for text, colour in items:  # a filled square in the reason's colour, then its text
        cv2.rectangle(out, (x, y - box), (x + box, y), colour, -1)
        x += box + 6
        cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale * fit, _INK, 1, cv2.LINE_AA)
        x += cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale * fit, 1)[0][0] + 16
    return out


def write_preview(path: str, slide, mask: np.ndarray, coords: np.ndarray, patch_size_level0: int,
                  legend: str, flags: np.ndarray | None = None, excluded=()) -> None:
    """Read ``slide`` at preview size and write the annotated PNG to ``path``."""
    rgb, downsample = thumbnail(slide, preview_downsample(slide.level_dimensions[0]))
    image = draw_preview(rgb, downsample, mask, coords, patch_size_level0, legend, flags, excluded)
    if not cv2.imwrite(path, image):
        raise SlideError(f"{path}: cannot write the preview PNG; check --preview")
