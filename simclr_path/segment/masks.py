"""Class masks on disk: one 8-bit channel, a class index per pixel, 255 where there is no class.

One reader and one writer for every command that takes or writes masks (``segment``'s labels,
``segment-eval``'s truth, ``select --annotated``, ``predict``'s output), so a mask one command
accepts no other refuses.
"""

from __future__ import annotations

import os
import tempfile

import cv2
import numpy as np

from simclr_path.errors import SimclrPathError

#: The mask value of a pixel with no class: unlabelled (labels), not scored (truth), not covered (predictions).
IGNORE = 255


def read_class_mask(path: str) -> np.ndarray:
    """uint8 (H, W) mask at ``path``. A grey image saved as three equal channels is taken as one."""
    mask = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED) if os.path.isfile(path) else None
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


def write_png(path: str, image: np.ndarray) -> None:
    """Write a uint8 image (H, W) one-channel or (H, W, 3) RGB as a PNG, atomically (temporary file, rename)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise SimclrPathError(f"{path}: the PNG could not be encoded (image {image.shape}); too large for PNG? "
                              "use a larger --downsample")
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(encoded.tobytes())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise SimclrPathError(f"{path}: cannot write the PNG ({exc.strerror or exc}); choose a folder you can write")\
            from None
