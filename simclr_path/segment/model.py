"""The segmentation network: segmentation_models_pytorch's ``Unet`` around our exported encoder.

``Unet(encoder_name="tu-<timm name>")`` wraps timm's ``features_only`` model, whose parameter names
are the backbone's own, so the export loads with every key matched (strict). The decoder starts
from random weights. The Unet needs an input side divisible by ``2 ** depth`` (32 for five
stages); :func:`matched_image_size` picks that side so the encoder sees patches at the resolution
it was pretrained at.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from simclr_path.downstream.encoder import read_encoder
from simclr_path.downstream.segmentation import load_smp_encoder
from simclr_path.errors import SimclrPathError, first_line
from simclr_path.segment.checkpoint import SEGMENT_CHECKPOINT, read_segment_checkpoint

#: The input side of a five-stage Unet must be a multiple of this.
SIZE_MULTIPLE = 32


def build_unet(timm_model: str, num_classes: int) -> nn.Module:
    """A randomly initialised ``smp.Unet`` on timm's ``timm_model`` (no download, ever)."""
    import segmentation_models_pytorch as smp

    if num_classes < 2:
        raise SimclrPathError(f"a segmentation needs at least 2 classes, got {num_classes}; list them with --classes")
    try:
        return smp.Unet(encoder_name=f"tu-{timm_model}", encoder_weights=None, classes=num_classes)
    except Exception as exc:  # timm has no such model, or it has no feature pyramid smp can use
        raise SimclrPathError(
            f"smp cannot build a Unet on timm's {timm_model!r} ({first_line(exc, 160)}); "
            "pretrain a CNN backbone with a feature pyramid (e.g. resnet18, resnet50)"
        ) from None


def unet_from_encoder(encoder_path: str, num_classes: int) -> tuple[nn.Module, dict]:
    """``(unet, encoder metadata)``: a Unet whose encoder is the export at ``encoder_path``, loaded strictly."""
    _, meta = read_encoder(encoder_path)
    model = build_unet(meta["timm_model"], num_classes)
    load_smp_encoder(model, encoder_path)
    return model, meta


def matched_image_size(patch_size: int, patch_mpp: float | None, encoder_input_mpp: float | None) -> int:
    """Network input side for store patches of ``patch_size`` px at ``patch_mpp`` um/px.

    Chosen so one input pixel is as close as possible to the encoder's pretraining input
    resolution (``encoder_input_mpp``), rounded to a multiple of :data:`SIZE_MULTIPLE`; the patch
    size itself (rounded the same way) when either resolution is unknown.
    """
    side = float(patch_size)
    if patch_mpp and encoder_input_mpp:
        side = patch_size * patch_mpp / encoder_input_mpp
    return max(SIZE_MULTIPLE, int(round(side / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def check_image_size(image_size: int) -> None:
    if image_size < SIZE_MULTIPLE or image_size % SIZE_MULTIPLE:
        raise SimclrPathError(
            f"--image-size must be a positive multiple of {SIZE_MULTIPLE} for the Unet, got {image_size}"
        )


#: Relative difference of patch resolution tolerated between a store and a run's training stores.
MPP_TOLERANCE = 0.02


def check_store_resolution(store, meta: dict, run: str) -> None:
    """Refuse stores whose patches are not what run ``run`` was trained on (size, and um/px within
    :data:`MPP_TOLERANCE`): the network would see tissue at another scale and say nothing."""
    trained_mpp, trained_size = meta.get("patch_mpp"), meta.get("patch_size")
    for path, attrs in zip(getattr(store, "paths", ()), getattr(store, "attrs", ())):  # images in memory: nothing to check
        mpp = attrs.get("target_mpp")
        mpp = float(mpp) if mpp is not None and math.isfinite(float(mpp)) else None
        size = int(attrs["patch_size"])
        wrong_mpp = trained_mpp and mpp and abs(mpp / trained_mpp - 1) > MPP_TOLERANCE
        if wrong_mpp or (trained_size and size != trained_size):
            at = f" at {trained_mpp:g} um/px" if trained_mpp else ""
            raise SimclrPathError(
                f"{path}: {size} px patches" + (f" at {mpp:g} um/px" if mpp else "") + f", but {run} was trained on "
                f"{trained_size} px patches{at}; tile the slides again with --patch-size {trained_size}"
                + (f" --mpp {trained_mpp:g}" if trained_mpp else "")
            )


def load_segment_run(run: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """``(model, meta)`` of a ``segment`` run folder (or its checkpoint file), in eval mode on ``device``.

    The weights are the EMA teacher's when the run trained one (FixMatch), else the student's.
    ``meta`` holds what inference needs: ``classes`` (names, index = class value), ``image_size``
    (network input side), ``mean``/``std``, ``input_mpp`` (um per network input pixel; None when
    unknown), ``patch_size`` and ``patch_mpp`` of the training stores, and ``timm_model``.
    """
    ckpt = read_segment_checkpoint(run)
    meta = dict(ckpt["meta"])
    model = build_unet(meta["timm_model"], len(meta["classes"]))
    weights = ckpt.get("teacher") or ckpt["model"]
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise SimclrPathError(f"{run}: weights do not fit the run's Unet ({first_line(exc, 160)})") from None
    return model.to(device).eval(), meta


def run_checkpoint_path(run: str) -> str:
    """The checkpoint file of a run folder (or ``run`` itself when it is a file)."""
    return os.path.join(run, SEGMENT_CHECKPOINT) if os.path.isdir(run) else run
