"""Patch geometry: from a requested resolution to a pyramid level and a grid of level-0 coordinates.

A patch is ``patch_size`` pixels at the *target* resolution. It covers
``scale = target_mpp / slide_mpp`` level-0 pixels per target pixel. We read it from the coarsest
pyramid level that is still at least as fine as the target (OpenSlide's
``get_best_level_for_downsample``), so pixels are only ever reduced, never invented, then resize
with area interpolation. The grid is laid in that level's integer pixels, starting at level-0
(0, 0), so coordinates are identical across runs and exact multiples of the level's downsample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from simclr_path.errors import SimclrPathError, SlideError
from simclr_path.wsi.slide import MICRONS_AT_1X, SlideMeta

#: A target finer than level 0 by less than this factor is read at level 0 and enlarged slightly
#: (a "0.25 um/px" request on a 0.2527 um/px scanner); anything finer is refused as upsampling.
UPSAMPLE_TOLERANCE = 0.05


@dataclass(frozen=True)
class TileSpec:
    """How to cut patches. Exactly one of ``target_mpp`` and ``magnification`` is set.

    Args:
        target_mpp: microns per pixel of the stored patches (default 0.5, i.e. ~20x).
        magnification: objective magnification instead of mpp (uses the slide's objective power
            when known, else 10x = 1 um/px).
        patch_size: side of a stored patch in target pixels (default 256).
        stride: step between patches in target pixels (default ``patch_size``: no overlap).
        min_tissue: smallest tissue fraction for a patch to be kept, in [0, 1] (default 0.5).
        codec: pixel codec of the store, ``"jpeg"`` or ``"raw"``.
        jpeg_quality: JPEG quality for the ``jpeg`` codec (default 90).
        qc: measure and flag pen ink, blur and folds per patch (:mod:`simclr_path.wsi.qc`;
            default True). Stored as the root attribute ``qc`` = ``"on"``/``"off"``.
    """

    target_mpp: float | None = 0.5
    magnification: float | None = None
    patch_size: int = 256
    stride: int | None = None
    min_tissue: float = 0.5
    codec: str = "jpeg"
    jpeg_quality: int = 90
    qc: bool = True

    def __post_init__(self):
        if (self.target_mpp is None) == (self.magnification is None):
            raise SimclrPathError("give exactly one of --mpp and --magnification")
        if self.target_mpp is not None and not (0 < self.target_mpp < 1000):
            raise SimclrPathError(f"--mpp must be a positive number of microns, got {self.target_mpp}")
        if self.magnification is not None and not (0 < self.magnification <= 1000):
            raise SimclrPathError(f"--magnification must be positive, got {self.magnification}")
        if not (8 <= self.patch_size <= 4096):
            raise SimclrPathError(f"--patch-size must be between 8 and 4096 pixels, got {self.patch_size}")
        if self.stride is not None and not (1 <= self.stride <= 4 * self.patch_size):
            raise SimclrPathError(
                f"--stride must be between 1 and 4x the patch size, got {self.stride}"
            )
        if not (0.0 <= self.min_tissue <= 1.0):
            raise SimclrPathError(f"--min-tissue is a fraction in [0, 1], got {self.min_tissue}")
        if self.codec not in ("jpeg", "raw"):
            raise SimclrPathError(f"--codec must be 'jpeg' or 'raw', got {self.codec!r}")
        if not (1 <= self.jpeg_quality <= 100):
            raise SimclrPathError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")

    @property
    def step(self) -> int:
        return self.stride or self.patch_size

    def as_attrs(self) -> dict:
        """Root attributes of a store; ``None`` becomes NaN (HDF5 has no null)."""
        attrs = {k: (math.nan if v is None else v) for k, v in asdict(self).items()}
        attrs["qc"] = "on" if self.qc else "off"
        return attrs


@dataclass(frozen=True)
class PatchPlan:
    """Where one slide's patches come from.

    Attributes:
        level: pyramid level the pixels are read from.
        level_downsample: that level's downsample (level-0 pixels per level pixel).
        scale: level-0 pixels per target pixel.
        read_size: patch side at ``level`` in level pixels (resized to ``patch_size`` if different).
        patch_size: patch side at the target resolution.
        step_level: grid step at ``level`` in level pixels (float; positions are rounded).
        target_mpp: microns per target pixel (NaN when the slide has no mpp).
        target_magnification: magnification of the target pixels (NaN when unknown).
    """

    level: int
    level_downsample: float
    scale: float
    read_size: int
    patch_size: int
    step_level: float
    target_mpp: float
    target_magnification: float

    @property
    def patch_size_level0(self) -> int:
        return int(round(self.read_size * self.level_downsample))


def plan_patches(meta: SlideMeta, spec: TileSpec, best_level_for_downsample) -> PatchPlan:
    """Choose level and scale for ``meta`` under ``spec``.

    ``best_level_for_downsample`` is the open slide's method of that name (kept injectable so the
    choice stays OpenSlide's own).
    """
    name = meta.path
    if spec.target_mpp is not None:
        if meta.mpp is None:  # --magnification helps only where the slide records its objective power
            raise SlideError(
                f"{name}: no microns-per-pixel in its metadata; pass --slide-mpp 0.25 (or --mpp-csv slide,mpp)"
                + (" or tile by --magnification" if meta.objective_power is not None else "")
            )
        scale = spec.target_mpp / meta.mpp
        target_mpp = spec.target_mpp
    else:
        if meta.objective_power is not None:
            scale = meta.objective_power / spec.magnification
        elif meta.mpp is not None:
            scale = (MICRONS_AT_1X / spec.magnification) / meta.mpp
        else:
            raise SlideError(
                f"{name}: neither objective power nor microns-per-pixel in its metadata; "
                "pass --slide-mpp 0.25 (or --mpp-csv slide,mpp)"
            )
        target_mpp = meta.mpp * scale if meta.mpp is not None else math.nan
    if scale < 1 - UPSAMPLE_TOLERANCE:
        finest = f"{meta.mpp:.3g} um/px" if meta.mpp else f"{meta.objective_power:g}x"
        raise SlideError(
            f"{name}: its finest level is {finest}; the requested resolution would upsample it "
            "- choose a coarser --mpp or lower --magnification"
        )
    level = int(best_level_for_downsample(max(scale, 1.0)))
    level_downsample = meta.level_downsamples[level]
    read_size = max(1, int(round(spec.patch_size * scale / level_downsample)))
    step_level = spec.step * scale / level_downsample
    if meta.objective_power is not None:
        target_mag = meta.objective_power / scale
    elif meta.mpp is not None:
        target_mag = MICRONS_AT_1X / (meta.mpp * scale)
    else:
        target_mag = math.nan
    return PatchPlan(
        level=level,
        level_downsample=level_downsample,
        scale=scale,
        read_size=read_size,
        patch_size=spec.patch_size,
        step_level=step_level,
        target_mpp=target_mpp,
        target_magnification=target_mag,
    )


def grid_coords(meta: SlideMeta, plan: PatchPlan) -> np.ndarray:
    """All grid positions whose patch lies inside the slide, as (N, 2) int64 level-0 (x, y).

    Positions are integer pixels of ``plan.level``, multiplied back to level 0, so a region read
    at a coordinate starts exactly on a level pixel. Row-major order (y, then x).
    """
    level_w, level_h = meta.level_dimensions[plan.level]

    def axis(length: int) -> np.ndarray:
        count = int(math.floor((length - plan.read_size) / plan.step_level)) + 1
        if count <= 0:
            return np.zeros(0, dtype=np.int64)
        starts = np.round(np.arange(count) * plan.step_level).astype(np.int64)
        starts = starts[starts + plan.read_size <= length]
        return np.round(starts * plan.level_downsample).astype(np.int64)

    xs, ys = axis(level_w), axis(level_h)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.int64)
