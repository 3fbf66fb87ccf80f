"""Two augmented views per patch (albumentations), read from patch stores in DataLoader workers.

Defaults follow SimCLR (Chen et al. 2020, appendix A): "random crop and resize (with random flip),
color distortion, and Gaussian blur"; colour jitter 0.8/0.8/0.8/0.2 applied with p=0.8, grayscale
with p=0.2, blur with p=0.5, crops covering 8-100% of the image. Adapted to pathology: tissue has
no up or down, so vertical flips and 90-degree rotations are added; hue jitter defaults weaker
(0.05) because hue carries the stain; albumentations' ``HEStain`` can perturb the stain itself.

Views stay uint8 HWC until the training step normalises them on the device.
Each sample's randomness comes from ``(seed, epoch, index)`` alone, so a run is reproducible and a
resumed run sees exactly the views an uninterrupted one would, whichever worker draws them. Within a
sample, every random decision of every transform, in each of the two views, is a separate draw from
one generator seeded that way (:func:`draw_views`): flips, rotations, crop, colour, grayscale and blur
fire independently of each other and of the other view.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

from simclr_path.data.normalize import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class ViewConfig:
    """Augmentation strengths; each maps one to one onto an albumentations argument.

    Args:
        image_size: side of each view in pixels (default 224).
        crop_scale: (min, max) area fraction of RandomResizedCrop (default (0.08, 1.0)).
        hflip_p, vflip_p: flip probabilities (default 0.5 each).
        rot90_p: probability of rotating by a random multiple of 90 degrees (default 0.5).
        jitter_p: probability of colour jitter (default 0.8).
        brightness, contrast, saturation, hue: jitter strengths (default 0.8, 0.8, 0.8, 0.05).
        grayscale_p: probability of grayscale (default 0.2).
        blur_p: probability of Gaussian blur (default 0.5), sigma in ``blur_sigma`` (0.1-2.0).
        he_stain_p: probability of H&E stain augmentation (default 0.0: off).
        light_p: probability that a view is light - crop, flips and rotations only, none of the
            photometric transforms (stain, colour jitter, grayscale, blur) - so training sees a mix
            of light and strong views (default 0.0: every view may get all of them, each at its own
            rate). Within a strong view the photometric transforms still fire independently.
        mean, std: normalisation, carried into the exported encoder (default ImageNet).
    """

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot90_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.05
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    he_stain_p: float = 0.0
    light_p: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def build_transform(cfg: ViewConfig, record: bool = False) -> A.Compose:
    """The albumentations pipeline producing one view (uint8 HWC in, uint8 HWC out).

    With ``record``, each result also lists the transforms that fired, with their parameters, under
    ``"applied_transforms"`` (albumentations' ``save_applied_params``).
    """
    size = cfg.image_size
    blur_kernel = 2 * int(round(0.05 * size)) + 1  # ~10% of the image, odd, as in SimCLR
    steps = [
        A.RandomResizedCrop(size=(size, size), scale=tuple(cfg.crop_scale), interpolation=cv2.INTER_LINEAR,
                            area_for_downscale="image"),
        A.HorizontalFlip(p=cfg.hflip_p),
        A.VerticalFlip(p=cfg.vflip_p),
        A.RandomRotate90(p=cfg.rot90_p),
    ]
    photometric = [A.HEStain(method="random_preset", p=cfg.he_stain_p)] if cfg.he_stain_p > 0 else []
    photometric += [
        A.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue,
                      p=cfg.jitter_p),
        A.ToGray(num_output_channels=3, p=cfg.grayscale_p),
        A.GaussianBlur(blur_limit=(blur_kernel, blur_kernel), sigma_limit=tuple(cfg.blur_sigma), p=cfg.blur_p),
    ]
    if cfg.light_p > 0:  # a light view skips the whole photometric block
        photometric = [A.Sequential(photometric, p=1.0 - cfg.light_p)]
    return A.Compose(steps + photometric, save_applied_params=record)


def draw_views(transform: A.Compose, image: np.ndarray, seed: int, n: int = 2) -> list[dict]:
    """``n`` views of ``image`` (albumentations result dicts), all randomness drawn from ``seed``.

    One numpy and one Python generator, seeded with ``seed``, are shared by every transform of the
    pipeline, so each decision is its own draw from one stream. (``Compose.set_random_seed`` would
    instead re-seed every child with the same seed, so all their first draws - flip, rotate,
    jitter, grayscale, blur - would be the same number and fire together.)
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return [transform(image=image) for _ in range(n)]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on the run seed, the epoch and the patch index."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")
