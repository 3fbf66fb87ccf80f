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


def he_texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Tissue everywhere: eosin-pink stroma with haematoxylin nuclei (hard-edged discs) and noise."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = (215, 140, 190)
    img = np.clip(img.astype(np.int16) + rng.integers(-12, 12, size=img.shape), 0, 255).astype(np.uint8)
    for x, y in rng.integers(0, [width, height], size=(width * height // 250, 2)):
        cv2.circle(img, (int(x), int(y)), int(rng.integers(2, 5)), (110, 50, 150), -1)
    return img


#: Known artefacts painted by :func:`qc_slide_image`, as level-0 boxes (x0, y0, x1, y1).
QC_BOXES = {"pen": (0, 256, 1536, 512), "blur": (768, 768, 1280, 1280), "fold": (128, 896, 512, 1280)}


def qc_slide_image(seed: int = 0) -> np.ndarray:
    """A 1536 x 1536 tissue image with a blue ink band, a blurred square and a folded square at
    :data:`QC_BOXES` (at 0.5 um/px and 128 px patches: 2 rows of ink, 4 x 4 blurred, 3 x 3 folded)."""
    img = he_texture(1536, 1536, seed)
    x0, y0, x1, y1 = QC_BOXES["pen"]
    ink = np.array([35, 60, 160], np.float32) / 255.0
    img[y0:y1, x0:x1] = (img[y0:y1, x0:x1].astype(np.float32) * ink).astype(np.uint8)
    x0, y0, x1, y1 = QC_BOXES["blur"]
    img[y0:y1, x0:x1] = cv2.GaussianBlur(img, (0, 0), 3.0)[y0:y1, x0:x1]
    x0, y0, x1, y1 = QC_BOXES["fold"]
    other = np.roll(img, (37, 53), axis=(0, 1))
    img[y0:y1, x0:x1] = (img[y0:y1, x0:x1].astype(np.float32) * other[y0:y1, x0:x1] / 255.0).astype(np.uint8)
    return img
