"""Small synthetic pyramidal TIFFs (tifffile) that OpenSlide reads as generic-tiff slides."""

from __future__ import annotations

import cv2
import numpy as np
import tifffile


def tissue_image(width: int, height: int, seed: int = 0, blank: bool = False) -> np.ndarray:
    """Glass-white background with a few textured, H&E-coloured blobs (unless ``blank``)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 238, np.uint8)
    img += rng.integers(0, 8, size=img.shape, dtype=np.uint8)
    if blank:
        return img
    for _ in range(3):
        center = (int(rng.integers(width // 4, 3 * width // 4)), int(rng.integers(height // 4, 3 * height // 4)))
        axes = (int(rng.integers(width // 8, width // 4)), int(rng.integers(height // 8, height // 4)))
        cv2.ellipse(img, center, axes, float(rng.integers(0, 180)), 0, 360, (205, 120, 185), -1)
    nuclei = rng.integers(0, [width, height], size=(width * height // 400, 2))
    for x, y in nuclei:
        if img[y, x, 1] < 200:
            cv2.circle(img, (int(x), int(y)), 3, (90, 40, 140), -1)
    return img


def write_slide(path, image: np.ndarray, mpp: float | None = 0.25, levels: int = 3, tile: int = 256,
                compression: str = "jpeg") -> str:
    """Write ``image`` as a tiled pyramid (each level half the previous) with optional mpp."""
    extra = {}
    if mpp is not None:
        extra = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(str(path)) as tw:
        level = image
        for i in range(levels):
            tw.write(level, tile=(tile, tile), compression=compression, photometric="rgb",
                     subfiletype=0 if i == 0 else 1, **extra)
            level = cv2.resize(level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return str(path)
