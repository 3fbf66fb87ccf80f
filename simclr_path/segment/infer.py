"""Running a trained segmentation Unet: class probabilities of store patches and of whole images.

Preprocessing is the training's, exactly: the run's :class:`~simclr_path.data.input_spec.InputSpec`
(from its ``image_size``, ``mean`` and ``std``) resizes a P x P uint8 RGB patch to the network input
side S and normalises it, the same calls ``segment`` trained through. The softmax of
the (N, C, S, S) logits is resized (bilinear) back to P x P, so probabilities are always at the
pixels that went in. On CUDA the forward runs under bf16 autocast; probabilities come back float32.

* :func:`predict_patches`: probabilities of many patches (a store, a subset, a list of arrays),
  streamed batch by batch through a DataLoader.
* :func:`patch_entropy`: one uncertainty number per store patch (the ``select`` command's
  entropy strategy).
* :func:`predict_image`: probabilities of one plain image of any size, by overlapping windows of
  S x S network pixels at the model's input resolution.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from simclr_path.data.input_spec import InputSpec
from simclr_path.errors import SimclrPathError, check_loader_options
from simclr_path.runtime.device import resolve_device
from simclr_path.runtime.images import resize_image
from simclr_path.segment.model import check_store_resolution, load_segment_run
from simclr_path.store.reader import PatchSubset


class _PatchInputs(torch.utils.data.Dataset):
    """(uint8 (3, S, S) network input, (H, W) original side in pixels) of each of ``images``."""

    def __init__(self, images: Sequence, spec: InputSpec):
        self.images, self.spec = images, spec

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = np.asarray(self.images[index])
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {index} is {image.dtype} {image.shape}; expected H x W x 3 uint8 RGB")
        tensor = torch.from_numpy(np.ascontiguousarray(self.spec.resize(image).transpose(2, 0, 1)))
        return tensor, torch.tensor(image.shape[:2])


def _softmax_logits(model: torch.nn.Module, batch: torch.Tensor, meta: dict, device: torch.device) -> torch.Tensor:
    """Softmax probabilities (N, C, S, S) float32 on ``device`` of uint8 network inputs (N, 3, S, S)."""
    x = InputSpec.from_meta(meta).to_model(batch, device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x)
    return torch.softmax(logits.float(), dim=1)


@torch.no_grad()
def predict_patches(model: torch.nn.Module, meta: dict, images: Sequence, *, device: torch.device | str,
                    batch_size: int = 32, workers: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Class probabilities of every image in ``images``, one batch at a time.

    Args:
        model: maps normalised float (N, 3, S, S) input to logits (N, C, S, S); put in eval mode
            for the duration (its training flag is restored afterwards).
        meta: the run's ``image_size`` (S), ``mean`` and ``std`` (see ``load_segment_run``).
        images: a PatchStore, PatchSubset, or sequence of H x W x 3 uint8 RGB arrays, all of one
            size P x P (a store's patches are).
        device: where the model runs (the model must already be there).
        batch_size: patches per forward pass.
        workers: DataLoader processes reading and resizing patches (0: in this process).

    Yields:
        ``(indices, probs)``: int64 positions in ``images`` of the batch, in order, and float32
        softmax probabilities (B, C, P, P) at the images' own pixels. Memory is one batch,
        whatever ``len(images)``.
    """
    device = torch.device(device)
    check_loader_options(batch_size, workers)
    loader = torch.utils.data.DataLoader(
        _PatchInputs(images, InputSpec.from_meta(meta)), batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),  # leaves global RNG alone
    )
    was_training = model.training
    model.eval()
    start = 0
    try:
        for batch, sides in loader:
            if (sides != sides[0]).any():
                raise SimclrPathError("images of different sizes in one prediction; give patches of one size")
            height, width = (int(v) for v in sides[0])
            probs = _softmax_logits(model, batch, meta, device)
            if probs.shape[-2:] != (height, width):
                probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
            positions = np.arange(start, start + len(batch), dtype=np.int64)
            yield positions, probs.cpu().numpy().astype(np.float32, copy=False)
            start += len(batch)
    finally:
        model.train(was_training)


def pixel_entropy(probs: np.ndarray, axis: int = 1) -> np.ndarray:
    """Shannon entropy (natural log, nats) of the class distribution along ``axis``; 0 log 0 counts as 0."""
    probs = np.asarray(probs, dtype=np.float32)
    logs = np.log(np.maximum(probs, np.finfo(np.float32).tiny))
    return -(probs * logs).sum(axis=axis)


def patch_entropy(run_dir: str, store, indices: np.ndarray, *, device: str = "auto", batch_size: int = 32,
                  workers: int = 2) -> np.ndarray:
    """How unsure the segment run ``run_dir`` is about each patch ``indices`` of ``store``.

    For each patch: the mean over its P x P pixels of the entropy (natural log) of the per-pixel
    softmax, divided by log(C) for C classes. So 0 means every pixel is predicted with certainty
    and 1 means every pixel is a uniform guess over the classes; the value does not depend on the
    number of classes or on the patch size.

    Returns:
        float32 array of ``len(indices)`` values in [0, 1], in the order of ``indices``.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    resolved = resolve_device(device)
    model, meta = load_segment_run(run_dir, resolved)
    check_store_resolution(store, meta, run_dir)
    out = np.zeros(len(indices), np.float32)
    if not len(indices):
        return out
    norm = math.log(len(meta["classes"]))
    for positions, probs in predict_patches(model, meta, PatchSubset(store, indices), device=resolved,
                                            batch_size=batch_size, workers=workers):
        entropy = pixel_entropy(probs).reshape(len(positions), -1).mean(axis=1)
        out[positions] = np.clip(entropy / norm, 0.0, 1.0)
    return out


def window_weights(size: int, stride: int) -> np.ndarray:
    """(size, size) float32 blending weights of one window, positive everywhere.

    Each side ramps up linearly over the first ``size - stride`` pixels (the overlap with the
    neighbouring window), is flat in the middle and ramps down over the last ones. With an overlap
    of at most half the window, the ramps of two neighbours add up to exactly 1, so overlapping
    predictions cross-fade: no seams, and each window's less reliable border counts least. No
    overlap (``stride == size``) gives uniform weights.
    """
    ramp = size - stride
    x = np.arange(size, dtype=np.float32) + 0.5
    line = np.ones(size, np.float32) if ramp <= 0 else np.minimum(1.0, np.minimum(x, size - x) / ramp)
    return np.outer(line, line).astype(np.float32)


def _rescaled(rgb: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return rgb
    height, width = rgb.shape[:2]
    size = (max(1, int(round(width * factor))), max(1, int(round(height * factor))))
    return resize_image(rgb, size)


def input_scale(meta: dict, image_mpp: float | None) -> float:
    """Network input pixels per image pixel for an image at ``image_mpp`` um/px.

    ``image_mpp / meta["input_mpp"]`` when both are known. When either is unknown the image is
    taken to be at the resolution of the training store's patches, which training resized from
    ``patch_size`` to ``image_size``: the factor is ``image_size / patch_size`` (1, no rescale, for
    runs whose input side equals the patch size).
    """
    if image_mpp is not None and not image_mpp > 0:
        raise SimclrPathError(f"--mpp must be a positive number of microns per pixel, got {image_mpp}")
    input_mpp = meta.get("input_mpp")
    if image_mpp and input_mpp:
        return float(image_mpp) / float(input_mpp)
    patch_size = meta.get("patch_size")
    return float(meta["image_size"]) / float(patch_size) if patch_size else 1.0


@torch.no_grad()
def predict_image(model: torch.nn.Module, meta: dict, rgb: np.ndarray, image_mpp: float | None, *,
                  device: torch.device | str, batch_size: int = 8, overlap: float = 0.25) -> np.ndarray:
    """Class probabilities (C, H, W) float32 at the pixels of one whole H x W x 3 uint8 RGB image.

    1. Rescale the image to the network's input resolution (factor :func:`input_scale`:
       ``image_mpp / meta["input_mpp"]``; when either is None, the image is assumed to be at the
       training store's resolution and rescaled by ``image_size / patch_size`` only, i.e. not at
       all when those are equal).
    2. Pad by reflection: a margin of one overlap width on the top and left, and on the bottom and
       right up to a whole number of windows, so every image pixel is covered and none sits on a
       window's very edge unless the image is smaller than a window.
    3. Slide windows of S x S (``meta["image_size"]``) with a stride of ``round(S * (1 - overlap))``
       and average the overlapping softmax probabilities with the :func:`window_weights` (linear
       cross-fade over the overlap, weights normalised per pixel).
    4. Crop the padding and resize (bilinear) back to H x W.

    Args:
        overlap: fraction of the window side that neighbouring windows share, in [0, 1).
        batch_size: windows per forward pass.
    """
    device = torch.device(device)
    if not 0 <= overlap < 1:
        raise SimclrPathError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise SimclrPathError(f"--batch must be >= 1, got {batch_size}")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"image is {rgb.dtype} {rgb.shape}; expected H x W x 3 uint8 RGB")
    height, width = rgb.shape[:2]
    size = int(meta["image_size"])
    stride = max(1, int(round(size * (1 - overlap))))
    margin = min(size - stride, size // 2)
    image = _rescaled(rgb, input_scale(meta, image_mpp))
    h, w = image.shape[:2]
    rows = max(1, math.ceil((margin + h - size) / stride) + 1)
    cols = max(1, math.ceil((margin + w - size) / stride) + 1)
    padded_h, padded_w = (rows - 1) * stride + size, (cols - 1) * stride + size
    border = cv2.BORDER_REFLECT_101 if min(h, w) > 1 else cv2.BORDER_REPLICATE
    image = cv2.copyMakeBorder(image, margin, padded_h - h - margin, margin, padded_w - w - margin, border)

    weights = window_weights(size, stride)
    weights_t = torch.from_numpy(weights).to(device)
    num_classes = len(meta["classes"])
    total = torch.zeros((num_classes, padded_h, padded_w), dtype=torch.float32, device=device)
    weight_sum = torch.zeros((padded_h, padded_w), dtype=torch.float32, device=device)
    corners = [(r * stride, c * stride) for r in range(rows) for c in range(cols)]
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(corners), batch_size):
            chunk = corners[first:first + batch_size]
            windows = np.stack([image[y:y + size, x:x + size] for y, x in chunk]).transpose(0, 3, 1, 2)
            probs = _softmax_logits(model, torch.from_numpy(np.ascontiguousarray(windows)), meta, device)
            for (y, x), p in zip(chunk, probs):
                total[:, y:y + size, x:x + size] += p * weights_t
                weight_sum[y:y + size, x:x + size] += weights_t
    finally:
        model.train(was_training)
    probs = (total / weight_sum)[:, margin:margin + h, margin:margin + w]
    if (h, w) != (height, width):
        probs = F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return probs.cpu().numpy().astype(np.float32, copy=False)
