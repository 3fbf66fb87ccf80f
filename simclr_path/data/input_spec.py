"""How a patch becomes a model input, decided in one place from the encoder's metadata.

As timm's ``resolve_data_config`` feeds its transforms, :class:`InputSpec` holds the input side,
mean and std that an export (``simclr_path`` metadata: ``input_size``, ``mean``, ``std``) or a
segment run (``image_size``, ``mean``, ``std``) records, and applies them the same way everywhere:

* on the host, :meth:`InputSpec.resize`: a uint8 (H, W, 3) patch to (S, S, 3) by the house rule
  (:func:`simclr_path.runtime.images.resize_image`: area when shrinking, bilinear when enlarging);
* on the device, :meth:`InputSpec.to_model`: uint8 NHWC or NCHW batches to float NCHW scaled to
  [0, 1] and standardised (channels_last memory when asked).

``embed``, ``eval``, ``select``, the kNN check during pretraining, ``segment`` training and
``segment``'s inference (``segment-eval``, ``predict``) all go through it, so a patch seen in
training and the same patch seen at inference are the same tensor.

Example::

    spec = InputSpec.from_meta(meta)               # an export's or a segment run's metadata
    x = spec.to_model(torch.from_numpy(spec.resize(patch))[None], device)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from simclr_path.data.normalize import normalize
from simclr_path.runtime.images import resize_image


@dataclass(frozen=True)
class InputSpec:
    """A model's input: side ``size`` in pixels, per-channel ``mean``/``std`` of [0, 1] RGB."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_meta(cls, meta: dict) -> "InputSpec":
        """From an export's metadata (``input_size`` [3, S, S]) or a segment run's (``image_size`` S)."""
        size = meta.get("image_size")
        if size is None:
            size = meta["input_size"][-1]
        return cls(int(size), tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"]))

    def resize(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> (S, S, 3), on the host (in loader workers)."""
        return resize_image(image, self.size)

    def to_model(self, batch: torch.Tensor, device: torch.device | str | None = None, *, channels_last: bool = False,
                 layout: str = "NCHW") -> torch.Tensor:
        """uint8 batch (``layout`` NCHW or NHWC) -> normalised float (N, 3, S, S) on ``device``."""
        return to_model_input(batch, self.mean, self.std, device, channels_last=channels_last, layout=layout)


def to_model_input(batch: torch.Tensor, mean, std, device: torch.device | str | None = None, *,
                   channels_last: bool = False, layout: str = "NCHW") -> torch.Tensor:
    """uint8 batch (``layout`` NCHW or NHWC) -> float (N, 3, H, W) on ``device``, scaled to [0, 1] and
    standardised with ``mean``/``std`` (sequences, or float32 tensors already on the device, as the
    training loop keeps them). The permute of an NHWC batch is already channels_last in memory and
    normalising keeps that layout, so ``channels_last`` then costs no copy."""
    x = batch.to(device, non_blocking=True) if device is not None else batch
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    elif layout != "NCHW":
        raise ValueError(f"layout must be NCHW or NHWC, got {layout!r}")
    x = normalize(x, mean, std)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
