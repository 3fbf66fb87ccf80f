"""Tiling previews: one PNG per slide to judge tissue detection and the kept patches by eye.

The preview is drawn at a readable size whatever the slide (long side :data:`PREVIEW_LONG_SIDE`
pixels, or the slide's own size when smaller), read from the pyramid in strips as the tissue
thumbnail is, so memory stays flat for any slide. It shows the tissue outline (green), each kept
patch (blue) and a one-line legend: slide, resolution, patches kept.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from simclr_path.errors import SlideError
from simclr_path.wsi.tissue import thumbnail

#: Long side of a preview in pixels.
PREVIEW_LONG_SIDE = 1800
_GREEN, _BLUE, _INK = (0, 170, 0), (255, 90, 0), (30, 30, 30)  # BGR


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


def draw_preview(rgb: np.ndarray, downsample: float, mask: np.ndarray, coords: np.ndarray, patch_size_level0: int,
                 legend: str) -> np.ndarray:
    """BGR image: ``rgb`` (the slide at ``downsample``) with tissue outline, patches and a legend band.

    ``mask`` is the tissue mask at any resolution (resized here); ``coords`` are level-0 top-left
    corners of the kept patches.
    """
    h, w = rgb.shape[:2]
    canvas = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    outline = (cv2.resize(mask.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_LINEAR) > 127).astype(np.uint8)
    contours, _ = cv2.findContours(outline, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, _GREEN, 2)
    side = patch_size_level0 / downsample
    for x, y in coords:
        x0, y0 = int(x / downsample), int(y / downsample)
        cv2.rectangle(canvas, (x0, y0), (int(x0 + side) - 1, int(y0 + side) - 1), _BLUE, 1)
    scale = max(0.45, min(1.0, w / 1800))
    (tw, th), base = cv2.getTextSize(legend, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    fit = min(1.0, (w - 16) / max(tw, 1))  # a long slide name must still fit in one line
    band = int((th + base) * fit) + 16
    out = np.full((h + band, w, 3), 255, np.uint8)
    out[:h] = canvas
    cv2.putText(out, legend, (8, h + band - base - 8), cv2.FONT_HERSHEY_SIMPLEX, scale * fit, _INK, 1, cv2.LINE_AA)
    return out


def write_preview(path: str, slide, mask: np.ndarray, coords: np.ndarray, patch_size_level0: int,
                  legend: str) -> None:
    """Read ``slide`` at preview size and write the annotated PNG to ``path``."""
    rgb, downsample = thumbnail(slide, preview_downsample(slide.level_dimensions[0]))
    image = draw_preview(rgb, downsample, mask, coords, patch_size_level0, legend)
    if not cv2.imwrite(path, image):
        raise SlideError(f"{path}: cannot write the preview PNG; check --preview")
