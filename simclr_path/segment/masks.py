"""Class masks on disk: one 8-bit channel, a class index per pixel, 255 where there is no class.

One reader for every command that takes or writes masks (``segment``'s labels,
``segment-eval``'s truth, ``select --annotated``, ``predict``'s output), so a mask one command
accepts no other refuses; they are written with :func:`simclr_path.runtime.files.write_png`.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from simclr_path.errors import SimclrPathError

#: The mask value of a pixel with no class: unlabelled (labels), not scored (truth), not covered (predictions).
IGNORE = 255


def read_class_mask(path: str) -> np.ndarray:
    """uint8 (H, W) mask at ``path``. A grey image saved as three equal channels is taken as one."""
    try:  # a zero-byte file makes imdecode raise rather than return None
        mask = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED) if os.path.isfile(path) else None
    except cv2.error:
        mask = None
    if mask is None:
        raise SimclrPathError(f"{path}: not a readable PNG mask; save masks as one-channel PNGs "
                              "(class index per pixel, 255 = unlabelled)")
    if mask.ndim == 3 and mask.dtype == np.uint8 and all(np.array_equal(mask[..., 0], mask[..., c])
                                                          for c in range(1, mask.shape[2])):
        mask = np.ascontiguousarray(mask[..., 0])
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise SimclrPathError(
            f"{path}: a mask must be one 8-bit channel of class indices (got shape {mask.shape}, {mask.dtype}); "
            "save it as a grayscale PNG"
        )
    return mask


def mask_downsample(path: str, shape: tuple[int, int], slide: str, width: int, height: int,
                    given: float | None = None) -> float:
    """Level-0 px per mask px of a (H, W) = ``shape`` mask of a ``width`` x ``height`` slide:
    ``given``, or inferred from the widths; the heights must agree within a pixel."""
    downsample = float(given) if given else width / shape[1]
    expected = (round(height / downsample), round(width / downsample))
    if abs(expected[0] - shape[0]) > 1 or abs(expected[1] - shape[1]) > 1:
        raise SimclrPathError(
            f"{path}: mask is {shape[1]}x{shape[0]} px but slide {slide} is {width}x{height} at level 0 "
            f"(expected {expected[1]}x{expected[0]} at downsample {downsample:g}); give a mask of the slide's "
            "shape at level 0 or at one downsample (--mask-downsample)"
        )
    return downsample
