"""The one rule for resizing image arrays, used by every stage that changes a patch's size.

Area interpolation when the image shrinks on either side (it averages the pixels that merge, so no
aliasing), bilinear when it grows. Ingesting images into a store, the network input of every
command (:class:`simclr_path.data.input_spec.InputSpec`) and whole-image inference all resize
through :func:`resize_image`, so no two commands can disagree on how a patch was resampled.
"""

from __future__ import annotations

import cv2
import numpy as np


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``image`` (H, W[, C]) resized to ``size`` (a side, or (width, height)); returned as is when
    already that size. Area interpolation when shrinking on either side, bilinear when enlarging."""
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrink = width < image.shape[1] or height < image.shape[0]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
