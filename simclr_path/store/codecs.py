"""Pixel codecs of the patch store.

``jpeg``: each patch is one baseline JPEG in a variable-length uint8 dataset; a patch decodes on
its own, which suits random access from data loaders. Chroma is kept at full resolution (4:4:4):
H&E contrast is mostly colour, and 4:2:0 subsampling roughly doubles the error on stained texture.
``raw``: an (N, P, P, 3) uint8 dataset, one LZF-compressed chunk per patch; lossless.
``bench/tile.py`` measures both (bytes per patch, random reads per second).
"""

from __future__ import annotations

import cv2
import h5py
import numpy as np

CODECS = ("jpeg", "raw")


def encode_jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(
        ".jpg",
        cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
        [
            cv2.IMWRITE_JPEG_QUALITY, int(quality),
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
        ],
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.reshape(-1)


def decode_jpeg(buf: np.ndarray) -> np.ndarray:
    bgr = cv2.imdecode(np.asarray(buf, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("corrupt JPEG patch")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def create_pixel_dataset(group: h5py.Group, codec: str, count: int, patch_size: int) -> h5py.Dataset:
    """Create the ``patches`` dataset for ``count`` patches under ``group``."""
    if codec == "jpeg":
        return group.create_dataset("patches", shape=(count,), dtype=h5py.vlen_dtype(np.uint8))
    return group.create_dataset(
        "patches",
        shape=(count, patch_size, patch_size, 3),
        dtype=np.uint8,
        chunks=(1, patch_size, patch_size, 3) if count else None,
        compression="lzf" if count else None,
    )


def encode_patches(patches: list[np.ndarray], codec: str, quality: int):
    """What a worker sends to the writer: JPEG byte arrays, or one stacked uint8 array."""
    if codec == "jpeg":
        return [encode_jpeg(p, quality) for p in patches]
    return np.stack(patches) if patches else np.zeros((0, 1, 1, 3), np.uint8)


def write_patches(dataset: h5py.Dataset, start: int, encoded, codec: str) -> None:
    if codec == "jpeg":
        for offset, buf in enumerate(encoded):
            dataset[start + offset] = buf
    else:
        dataset[start : start + len(encoded)] = encoded


def read_patch(dataset: h5py.Dataset, index: int, codec: str) -> np.ndarray:
    if codec == "jpeg":
        return decode_jpeg(dataset[index])
    return dataset[index]
