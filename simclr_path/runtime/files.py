"""Files: writing output images atomically (a temporary file beside the target, then a rename), and a
file's content digest (the identity of an encoder or a label file)."""

from __future__ import annotations

import hashlib
import os
import tempfile

import cv2
import numpy as np

from simclr_path.errors import SimclrPathError


def write_png(path: str, image: np.ndarray) -> None:
    """Write a uint8 image, (H, W) one channel or (H, W, 3) RGB, as a PNG at ``path`` atomically."""
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


def file_sha256(path: str, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes (an encoder's identity: any re-export or retraining changes it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()
