"""Tissue detection on a low-resolution view of a slide (CPU, OpenCV).

The recipe follows CLAM's segmentation: saturation channel of HSV, median blur, Otsu threshold
(floored so a blank slide finds nothing), morphological closing, then removal of specks and
filling of small holes. Brightfield H&E tissue is saturated while glass is white or grey, so the
saturation channel separates them well; fluorescence slides are mostly unsaturated and come out
with little or no tissue, which is reported, not treated as a failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from simclr_path.wsi.slide import read_rgb

#: Target bytes of one strip when building a thumbnail; keeps memory flat for any slide size.
STRIP_BYTES = 64 << 20


@dataclass(frozen=True)
class TissueParams:
    """Tissue detector settings.

    Args:
        median_kernel: median blur kernel on the saturation channel, mask pixels (default 7).
        min_saturation: floor for the Otsu threshold, 0-255 (default 15): glass never passes.
        close_kernel: morphological closing kernel, mask pixels (default 5).
        min_area_fraction: tissue pieces smaller than this fraction of the mask are dropped
            (default 1e-4).
    """

    median_kernel: int = 7
    min_saturation: int = 15
    close_kernel: int = 5
    min_area_fraction: float = 1e-4


def thumbnail(slide, downsample: float) -> tuple[np.ndarray, float]:
    """RGB view of the whole slide at about ``downsample`` level-0 pixels per pixel.

    Reads the best pyramid level in horizontal strips and shrinks each strip with area
    interpolation, so a slide with a single gigapixel level never sits in memory whole.
    Returns the image and its exact downsample (level-0 pixels per thumbnail pixel, x axis).
    """
    w0, h0 = slide.level_dimensions[0]
    out_w = max(1, int(round(w0 / downsample)))
    out_h = max(1, int(round(h0 / downsample)))
    level = slide.get_best_level_for_downsample(downsample)
    ds_level = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    rows_per_out = lh / out_h  # level rows per thumbnail row
    out_rows_per_strip = max(1, int(STRIP_BYTES // (4 * lw * max(rows_per_out, 1.0))))
    image = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for r0 in range(0, out_h, out_rows_per_strip):
        r1 = min(out_h, r0 + out_rows_per_strip)
        y0 = int(round(r0 * rows_per_out))
        y1 = min(lh, max(y0 + 1, int(round(r1 * rows_per_out))))
        strip = read_rgb(slide, (0, int(round(y0 * ds_level))), level, (lw, y1 - y0))
        image[r0:r1] = cv2.resize(strip, (out_w, r1 - r0), interpolation=cv2.INTER_AREA)
    return image, w0 / out_w


def tissue_mask(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """Binary tissue mask (uint8 0/1) of an RGB thumbnail."""
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    k = params.median_kernel | 1
    if min(saturation.shape) > k:
        saturation = cv2.medianBlur(saturation, k)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(float(otsu), float(params.min_saturation))
    mask = (saturation > threshold).astype(np.uint8)
    if params.close_kernel > 1:
        kernel = np.ones((params.close_kernel, params.close_kernel), np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    min_area = max(1, int(params.min_area_fraction * mask.size))
    mask = _drop_small_components(mask, min_area)
    holes = _drop_small_components(1 - mask, min_area)  # small background islands become tissue
    return (1 - holes).astype(np.uint8)


def _drop_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, dtype=np.uint8)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


def mask_downsample(patch_size_level0: float, level0_size: tuple[int, int]) -> float:
    """Level-0 pixels per mask pixel: about 16 mask pixels across a patch, at most 64x, and a
    mask no larger than 8192 pixels on its long side."""
    ds = min(64.0, max(1.0, patch_size_level0 / 16.0))
    return max(ds, max(level0_size) / 8192.0)


def tissue_fractions(
    mask: np.ndarray, mask_ds: float, coords: np.ndarray, patch_size_level0: float
) -> np.ndarray:
    """Fraction of each patch's level-0 box covered by tissue, via an integral image."""
    if len(coords) == 0:
        return np.zeros(0, dtype=np.float32)
    integral = cv2.integral(mask, sdepth=cv2.CV_64F)
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / mask_ds), 0, w - 1).astype(np.int64)
    y0 = np.clip(np.floor(coords[:, 1] / mask_ds), 0, h - 1).astype(np.int64)
    side = max(1, int(math.ceil(patch_size_level0 / mask_ds)))
    x1 = np.clip(x0 + side, 1, w)
    y1 = np.clip(y0 + side, 1, h)
    area = (x1 - x0) * (y1 - y0)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (total / np.maximum(area, 1)).astype(np.float32)
