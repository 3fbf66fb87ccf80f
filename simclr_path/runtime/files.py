"""Files: writing output images atomically (a temporary file beside the target, then a rename), and a
file's content digest (the identity of an encoder or a label file)."""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import zlib

import cv2
import numpy as np

from simclr_path.errors import SimclrPathError


def write_png(path: str, image: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write a uint8 image, (H, W) one channel or (H, W, 3) RGB, as a PNG at ``path`` atomically;
    ``text`` goes into ``tEXt`` chunks (what a mask's values mean, read back by Pillow's ``info``)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise SimclrPathError(f"{path}: the PNG could not be encoded (image {image.shape}); too large for PNG? "
                              "use a larger --downsample")
    encoded = _with_text(encoded.tobytes(), text or {})
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(encoded)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise SimclrPathError(f"{path}: cannot write the PNG ({exc.strerror or exc}); choose a folder you can write")\
            from None


def _with_text(png: bytes, text: dict[str, str]) -> bytes:
    """``png`` with a ``tEXt`` chunk per item inserted after its header chunk (IHDR, always first)."""
    header_end = 8 + 4 + 4 + 13 + 4  # signature, then IHDR's length, type, 13 data bytes, CRC
    chunks = b""
    for key, value in text.items():
        data = key.encode("latin-1") + b"\0" + value.encode("latin-1")
        chunks += struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:header_end] + chunks + png[header_end:]


def file_sha256(path: str, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes (an encoder's identity: any re-export or retraining changes it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()
