"""How ``segment`` hands a pretrained encoder to its decoder: a frozen start and batch-norm statistics.

Two settings of :class:`~simclr_path.segment.config.SegmentConfig`, both off by default:

* ``freeze_encoder_steps``: for the first N steps only the decoder (and head) learn; the encoder's
  weights get no gradient and its batch norm normalises with its running statistics, so the
  decoder first learns to read the pretrained features as they are (linear-probe-then-fine-tune,
  Kumar et al. 2022) instead of the encoder being pulled towards a random decoder's gradients.
* ``recalibrate_bn``: before the first step, the encoder's batch-norm running statistics are
  re-estimated on the stores' patches as inference sees them (resized, normalised, no
  augmentation), then held for the whole run: the encoder's batch norm normalises with them in
  training too (eval mode; its scale and shift still learn) and records nothing. Pretraining
  recorded its statistics on SimCLR's views (colour jitter, grayscale, blur, stain changes), not
  the images segmentation sees; and a fine-tuning batch (8 patches by default) gives noisy batch
  statistics, where these come from thousands of patches. Re-estimated but not held, they would be
  inert: a batch norm in training mode normalises with the batch's own statistics and overwrites
  its running ones within a few dozen steps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.optim.swa_utils import update_bn

from simclr_path.data.input_spec import InputSpec

#: Patches read to re-estimate the batch-norm statistics (at most; all of a smaller store), and per forward.
RECALIBRATION_PATCHES = 2048
RECALIBRATION_BATCH = 64


def batch_norms(module: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def set_encoder_mode(model: torch.nn.Module, frozen: bool, hold_bn: bool = False) -> None:
    """Freeze (or release) ``model.encoder`` inside a model in training mode: no gradients to its
    weights, and its batch norm in eval mode (running statistics used, none recorded). ``hold_bn``
    keeps the batch norm in eval mode while the weights train (held statistics, learnt scale and shift)."""
    model.encoder.requires_grad_(not frozen)
    model.encoder.train(not frozen and model.training)
    if hold_bn:
        for layer in batch_norms(model.encoder):
            layer.eval()


def recalibrate_encoder_bn(model: torch.nn.Module, store, spec: InputSpec, device: torch.device, seed: int = 0,
                           max_patches: int = RECALIBRATION_PATCHES, batch: int = RECALIBRATION_BATCH) -> int:
    """Replace the running mean and variance of every batch norm in ``model.encoder`` by their
    average over up to ``max_patches`` of ``store``'s patches (a seeded sample; all of a smaller
    store), fed as inference feeds them (torch's ``update_bn``). Weights are untouched; returns the
    number of patches read."""
    if not batch_norms(model.encoder) or len(store) == 0:
        return 0
    count = min(max_patches, len(store))
    # in the sample's random order: update_bn averages per-batch variances, so a batch must be drawn
    # across the store (a run of neighbouring patches, from two or three images, would leave out the
    # variance between images - stain, colour - and give too low a variance)
    chosen = np.random.default_rng(seed).choice(len(store), size=count, replace=False)

    def batches():
        for start in range(0, count, batch):
            images = np.stack([spec.resize(store[int(i)]) for i in np.sort(chosen[start:start + batch])])
            yield spec.to_model(torch.from_numpy(images), device, channels_last=True, layout="NHWC")

    with torch.no_grad():
        update_bn(batches(), model.encoder)
    return count
