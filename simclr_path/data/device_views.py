"""Two views per patch made on the training device, for the whole batch at once (``--augment device``).

The loader workers only read and decode stored patches; this module turns a batch of uint8 patches
into the two normalised view batches the model takes, on the GPU (or the CPU) that trains. It is
the batched twin of the albumentations pipeline in :mod:`simclr_path.data.views`, which stays the
reference (``--augment cpu``): the same :class:`~simclr_path.data.views.ViewConfig`, every option
with the same meaning, the transforms in the same order:

1. random resized crop (area fraction in ``crop_scale``, aspect ratio 3/4-4/3 on a log scale, ten
   tries then the whole patch, as albumentations' ``RandomResizedCrop``), resampled to
   ``image_size`` with ``torchvision.ops.roi_align`` - bilinear when enlarging, the mean of a few
   bilinear samples per output pixel when shrinking (albumentations uses INTER_AREA there);
2. horizontal flip, vertical flip, rotation by a random multiple of 90 degrees (0 included, as
   ``RandomRotate90`` draws it);
3. the photometric block, skipped whole by a light view (``light_p``):
   H&E stain (``HEStain(method="random_preset")``: one of albumentations' eight reference stain
   matrices, per-stain intensity scale and shift in optical density, tissue pixels only), colour
   jitter (brightness, contrast, saturation, hue factors drawn as ``ColorJitter`` draws them and
   applied in a random order per view), grayscale (ITU-R 601 weights), Gaussian blur (kernel
   ``2 * round(0.05 * size) + 1``, sigma in ``blur_sigma``, reflected borders).

kornia is used for its functional ops (hue rotation, per-view Gaussian blur), not for its
``kornia.augmentation`` classes: those draw their own parameters (not from our per-step generator,
nor in albumentations' way), and ``RandomResizedCrop`` measured 2.5x slower than one ``roi_align``
on the CPU (128 views, 256 -> 224 px). The H&E stain has no library version; it is written here.

Every random decision is drawn per view, each transform from its own draws, from one
``torch.Generator`` seeded by :func:`batch_seed` ``(seed, step, rank)``: the views of a step depend
on nothing else (not on the number of loader workers, nor on the device).

Differences from the albumentations pipeline, none of which changes what an option means: pixels
stay float in [0, 1] from the crop to the normalisation (albumentations rounds to uint8 after every
transform); hue is rotated in kornia's continuous HSV (albumentations uses OpenCV's 180-step uint8
hue); crops shrinking a patch average bilinear samples rather than whole source pixels. The per-
channel colour statistics of the two pipelines agree (tests/test_device_views.py states the bound).

Usage::

    views = DeviceViews(ViewConfig(image_size=224), seed=0).to("cuda")
    batch = views(patches_u8.to("cuda"), step=17)   # (B, S, S, 3) uint8 -> (2B, 3, 224, 224) float
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import albumentations as A
import kornia
import torch
from albumentations.augmentations.pixel.functional import STAIN_MATRICES
from torch import nn
from torchvision.ops import roi_align

from simclr_path.data.views import ViewConfig

#: RandomResizedCrop's aspect-ratio range (albumentations' default, which views.py keeps).
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
#: Luminosity (0-1) below which HEStain treats a pixel as tissue (albumentations' get_tissue_mask).
TISSUE_LUMINOSITY = 0.85
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # OpenCV's RGB2GRAY, what ToGray and the jitter's grey use

#: ``--augment auto`` off CUDA: the pipeline bench/views.py measured faster end to end on a 2-core CPU.
CPU_DEFAULT = "cpu"


def resolve_augment(choice: str, device_type: str) -> str:
    """``device`` or ``cpu`` for ``--augment`` ``choice`` (``auto``: device on CUDA, else :data:`CPU_DEFAULT`)."""
    if choice != "auto":
        return choice
    return "device" if device_type == "cuda" else CPU_DEFAULT


def batch_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed for the views of optimiser step ``step`` on ``rank`` of a run seeded ``seed``."""
    digest = hashlib.blake2b(f"views:{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian kernel side, about 10% of the view (SimCLR's), as :func:`~simclr_path.data.views.build_transform`."""
    return 2 * int(round(0.05 * image_size)) + 1


@dataclass
class ViewParams:
    """Every random parameter of ``n`` views, one row per view (CPU tensors).

    ``crop`` is (n, 4) ``x0, y0, x1, y1`` in patch pixels (end exclusive); the boolean fields say
    whether a transform fired; ``rot90`` is the number of quarter turns (0-3, 0 when it did not
    fire); ``order`` is each view's colour-jitter order (a permutation of brightness 0, contrast 1,
    saturation 2, hue 3).
    """

    crop: torch.Tensor
    hflip: torch.Tensor
    vflip: torch.Tensor
    rot90_fired: torch.Tensor
    rot90: torch.Tensor
    light: torch.Tensor
    stain: torch.Tensor
    stain_preset: torch.Tensor
    stain_scale: torch.Tensor
    stain_shift: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor

    def labels(self, patch_side: int) -> list[str]:
        """Per view, the transforms that fired, as the ``views`` contact sheet writes them."""
        out = []
        for i in range(len(self.hflip)):
            x0, y0, x1, y1 = self.crop[i].tolist()
            words = [f"crop {round(100 * (x1 - x0) * (y1 - y0) / patch_side ** 2)}%"]
            words += [name for name, fired in (("hflip", self.hflip), ("vflip", self.vflip)) if fired[i]]
            if self.rot90[i] % 4:
                words.append(f"rot{90 * int(self.rot90[i])}")
            words += [name for name, fired in (("stain", self.stain), ("jitter", self.jitter), ("gray", self.gray),
                                               ("blur", self.blur)) if fired[i]]
            out.append(" ".join(words))
        return out


def _uniform(generator: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _jitter_range(strength: float) -> tuple[float, float]:
    """ColorJitter's factor range for a brightness/contrast/saturation strength: [max(0, 1 - s), 1 + s]."""
    return max(0.0, 1.0 - strength), 1.0 + strength


def draw_params(cfg: ViewConfig, n: int, patch_side: int, generator: torch.Generator) -> ViewParams:
    """Random parameters of ``n`` views of ``patch_side`` px square patches, each transform from its own draws.

    Every draw is made whether or not its transform fires, so the stream of one transform never
    depends on the probability of another.
    """
    g = generator
    # random resized crop: CROP_TRIES tries per view, the first that fits wins, else the whole patch
    area = patch_side * patch_side
    target = _uniform(g, (n, CROP_TRIES), cfg.crop_scale[0] * area, cfg.crop_scale[1] * area)
    ratio = torch.exp(_uniform(g, (n, CROP_TRIES), math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    width = torch.round(torch.sqrt(target * ratio))
    height = torch.round(torch.sqrt(target / ratio))
    fits = (width > 0) & (width <= patch_side) & (height > 0) & (height <= patch_side)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)[:, None]
    width = torch.where(first >= 0, width.gather(1, pick)[:, 0], torch.full((n,), float(patch_side)))
    height = torch.where(first >= 0, height.gather(1, pick)[:, 0], torch.full((n,), float(patch_side)))
    start = torch.rand((n, 2), generator=g, dtype=torch.float64)
    y0 = torch.floor((patch_side - height + 1) * start[:, 0])
    x0 = torch.floor((patch_side - width + 1) * start[:, 1])
    crop = torch.stack([x0, y0, x0 + width, y0 + height], 1).float()

    def fires(p: float) -> torch.Tensor:
        return torch.rand(n, generator=g, dtype=torch.float64) < p

    hflip, vflip = fires(cfg.hflip_p), fires(cfg.vflip_p)
    rot90_fired = fires(cfg.rot90_p)
    rot90 = torch.where(rot90_fired, torch.randint(0, 4, (n,), generator=g), 0)
    light = fires(cfg.light_p)
    stain = fires(cfg.he_stain_p) & ~light
    he = _he_stain_settings()
    stain_preset = torch.randint(0, len(STAIN_MATRICES), (n,), generator=g)
    stain_scale = _uniform(g, (n, 2), *he.intensity_scale_range).float()
    stain_shift = _uniform(g, (n, 2), *he.intensity_shift_range).float()
    jitter = fires(cfg.jitter_p) & ~light
    brightness = _uniform(g, n, *_jitter_range(cfg.brightness)).float()
    contrast = _uniform(g, n, *_jitter_range(cfg.contrast)).float()
    saturation = _uniform(g, n, *_jitter_range(cfg.saturation)).float()
    hue = _uniform(g, n, -cfg.hue, cfg.hue).float()
    order = torch.argsort(torch.rand((n, 4), generator=g), dim=1)
    gray = fires(cfg.grayscale_p) & ~light
    blur = fires(cfg.blur_p) & ~light
    sigma = _uniform(g, n, *cfg.blur_sigma).float()
    return ViewParams(crop, hflip, vflip, rot90_fired, rot90, light, stain, stain_preset, stain_scale, stain_shift,
                      jitter, brightness, contrast, saturation, hue, order, gray, blur, sigma)


@functools.lru_cache(maxsize=1)
def _he_stain_settings() -> A.HEStain:
    """albumentations' HEStain as views.py builds it: its intensity ranges are the ones we draw from."""
    return A.HEStain(method="random_preset")


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luminosity with OpenCV's weights."""
    w = x.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _rows(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def adjust_brightness(x, factor):
    return (x * _rows(factor)).clamp_(0, 1)


def adjust_contrast(x, factor):
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    return (x * _rows(factor) + mean * (1 - _rows(factor))).clamp_(0, 1)


def adjust_saturation(x, factor):
    return (x * _rows(factor) + _gray(x) * (1 - _rows(factor))).clamp_(0, 1)


def adjust_hue(x, factor):
    """Rotate hue by ``factor`` turns (ColorJitter's hue: -0.5..0.5), in kornia's HSV (radians).

    (A hand-written RGB -> HSV -> RGB measured only 12% faster on the CPU; kornia's is kept.)
    """
    return kornia.enhance.adjust_hue(x, factor * (2 * math.pi)).clamp_(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def he_stain(x: torch.Tensor, matrices: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Batched albumentations ``apply_he_stain_augmentation`` (augment_background=False).

    ``x`` (n, 3, H, W) in [0, 1]; ``matrices`` (n, 2, 3) stain vectors (haematoxylin, eosin) in
    optical density; ``scale``/``shift`` (n, 2). Stain concentrations come from the regularised
    least-squares fit ``(M M^T + 1e-6 I) c = M od``; on tissue pixels (luminosity < 0.85) they are
    scaled and shifted; every pixel is then rebuilt from its concentrations.
    """
    density = -torch.log(x.clamp(min=1e-6))
    eye = torch.eye(2, dtype=x.dtype, device=x.device)
    projection = torch.linalg.solve(matrices @ matrices.transpose(1, 2) + 1e-6 * eye, matrices)  # (n, 2, 3)
    concentration = torch.einsum("nkc,nchw->nkhw", projection, density)
    tissue = _gray(x) < TISSUE_LUMINOSITY
    changed = concentration * scale[:, :, None, None] + shift[:, :, None, None]
    concentration = torch.where(tissue, changed, concentration)
    return torch.exp(-torch.einsum("nkc,nkhw->nchw", matrices, concentration)).clamp_(0, 1)


def apply_views(patches: torch.Tensor, source: torch.Tensor, params: ViewParams, cfg: ViewConfig,
                stain_matrices: torch.Tensor | None = None) -> torch.Tensor:
    """Views in [0, 1], float (n, 3, S, S), of ``patches`` (B, 3, P, P) float in [0, 1] on their device.

    View ``i`` is made from patch ``source[i]`` with row ``i`` of ``params``. ``params`` stay on the
    CPU: which views each transform touches is decided there, and only the rows needed travel to the
    device, so the device never waits for the host (no ``nonzero`` on device tensors, no syncs).
    """
    device, size = patches.device, cfg.image_size

    def on_device(values: torch.Tensor) -> torch.Tensor:
        return values.to(device, non_blocking=True)

    def rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(CPU index, device index) of the views where ``mask`` (CPU) is set; None when there are none."""
        index = mask.nonzero()[:, 0]
        return (index, on_device(index)) if index.numel() else None

    boxes = on_device(torch.cat([source.cpu().to(params.crop)[:, None], params.crop], 1))
    # aligned=True: box edges are pixel edges; adaptive sampling averages ceil(crop / size) samples per bin
    x = roi_align(patches, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    x = torch.where(_rows(on_device(params.hflip)), x.flip(3), x)
    x = torch.where(_rows(on_device(params.vflip)), x.flip(2), x)
    for turns in (1, 2, 3):
        if (picked := rows(params.rot90 == turns)) is not None:
            x[picked[1]] = torch.rot90(x[picked[1]], turns, dims=(2, 3))
    if (picked := rows(params.stain)) is not None:
        cpu, dev = picked
        table = stain_matrices.to(device) if stain_matrices is not None else stain_matrix_table(device)
        matrices = table[on_device(params.stain_preset[cpu])]
        x[dev] = he_stain(x[dev], matrices, on_device(params.stain_scale[cpu]), on_device(params.stain_shift[cpu]))
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for position in range(4):
        for op in range(4):
            if (picked := rows(params.jitter & (params.order[:, position] == op))) is not None:
                cpu, dev = picked
                x[dev] = JITTER_OPS[op](x[dev], on_device(factors[op][cpu]))
    if (picked := rows(params.gray)) is not None:
        x[picked[1]] = _gray(x[picked[1]]).expand(-1, 3, -1, -1)
    if (picked := rows(params.blur)) is not None:
        cpu, dev = picked
        k = blur_kernel_size(size)
        sigma = on_device(params.sigma[cpu][:, None].expand(-1, 2).contiguous())
        x[dev] = kornia.filters.gaussian_blur2d(x[dev], (k, k), sigma, border_type="reflect")
    return x


def stain_matrix_table(device=None) -> torch.Tensor:
    """albumentations' reference stain matrices, (8, 2, 3) float32, in its preset order."""
    return torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in STAIN_MATRICES.values()]).to(device)


def as_nchw_float(patches: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) -> float (B, 3, H, W) in [0, 1]."""
    if patches.dim() != 4 or 3 not in (patches.shape[1], patches.shape[3]):
        raise ValueError(f"patches must be (B, H, W, 3) or (B, 3, H, W), got {tuple(patches.shape)}")
    if patches.shape[-1] == 3 and patches.shape[1] != 3:
        patches = patches.permute(0, 3, 1, 2)
    return patches.float().div_(255.0).contiguous()


class DeviceViews(nn.Module):
    """The two views of every patch of a batch, made where the batch is (GPU or CPU).

    Args:
        cfg: augmentation settings (the same :class:`ViewConfig` as the albumentations pipeline).
        seed: run seed; the views of a step depend only on ``(seed, step, rank)``.
        rank: this process's rank (each rank draws its own views).
        channels_last: return the views in channels_last memory format.

    ``forward(patches, step)``: uint8 (B, H, W, 3) or (B, 3, H, W) square patches -> normalised float
    (2B, 3, S, S), all first views then all second views (the layout the loss takes).

    Example::

        views = DeviceViews(ViewConfig(image_size=96), seed=0)
        x = views(torch.randint(0, 256, (8, 128, 128, 3), dtype=torch.uint8), step=0)   # (16, 3, 96, 96)
    """

    def __init__(self, cfg: ViewConfig, seed: int = 0, rank: int = 0, channels_last: bool = False):
        super().__init__()
        self.cfg, self.seed, self.rank, self.channels_last = cfg, seed, rank, channels_last
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("stain_matrices", stain_matrix_table(), persistent=False)

    def draw(self, patches: torch.Tensor, step: int) -> tuple[torch.Tensor, ViewParams]:
        """Views in [0, 1] (2B, 3, S, S) and their parameters (on the CPU) for ``step``."""
        x = as_nchw_float(patches)
        batch, side = x.shape[0], x.shape[-1]
        generator = torch.Generator().manual_seed(batch_seed(self.seed, step, self.rank))
        params = draw_params(self.cfg, 2 * batch, side, generator)
        source = torch.arange(2 * batch) % batch
        views = apply_views(x, source, params, self.cfg, self.stain_matrices)
        return views, params

    def forward(self, patches: torch.Tensor, step: int) -> torch.Tensor:
        views, _ = self.draw(patches, step)
        views = (views - self.mean.to(views.device)) / self.std.to(views.device)
        return views.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
