"""Per-slide work done in tiling workers: planning a slide, and cutting blocks of patches.

Both functions are top-level and take plain data so a process pool can run them. A worker keeps
its open slides in a small cache; OpenSlide handles never cross processes.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

from .codecs import encode_patches
from .errors import SlideError
from .grid import PatchPlan, TileSpec, grid_coords, plan_patches
from .slide import SlideMeta, open_slide, read_meta, read_rgb
from .tissue import mask_downsample, thumbnail, tissue_fractions, tissue_mask

#: Side of the level region one task reads, in level pixels (an 8x8 block of 256 px patches).
BLOCK_PIXELS = 2048

_open_slides: "OrderedDict[str, object]" = OrderedDict()


def cached_slide(path: str):
    """An OpenSlide handle for ``path``, kept open across tasks in this process (up to 4)."""
    slide = _open_slides.pop(path, None)
    if slide is None:
        slide = open_slide(path)
    _open_slides[path] = slide
    while len(_open_slides) > 4:
        _open_slides.popitem(last=False)[1].close()
    return slide


@dataclass
class SlidePlan:
    """A slide ready to be cut: what it is, how, and which patches to keep."""

    meta: SlideMeta
    plan: PatchPlan
    coords: np.ndarray  # (N, 2) int64 level-0 top-left of kept patches
    tissue_fraction: np.ndarray  # (N,) float32
    grid_cells: np.ndarray  # (N, 2) int64 (row, col) of kept patches in the full grid
    grid_total: int  # patches in the full grid before tissue filtering


def prepare_slide(
    path: str,
    spec: TileSpec,
    fallback_mpp: float | None,
    mpp_table: dict[str, float] | None,
    preview_dir: str | None,
    preview_name: str,
) -> SlidePlan:
    """Open a slide, resolve its resolution, find tissue, and list the patches to keep."""
    slide = cached_slide(path)
    try:
        meta = read_meta(slide, path, fallback_mpp, mpp_table)
        plan = plan_patches(meta, spec, slide.get_best_level_for_downsample)
        coords = grid_coords(meta, plan)
        mask_ds = mask_downsample(plan.patch_size_level0, meta.dimensions)
        thumb, mask_ds = thumbnail(slide, mask_ds)
    except SlideError:
        raise
    except Exception as exc:  # OpenSlide raises on corrupt tiles mid-read
        raise SlideError(f"{path}: cannot be read ({_first_line(exc)}); re-export or remove it") from None
    mask = tissue_mask(thumb)
    fractions = tissue_fractions(mask, mask_ds, coords, plan.patch_size_level0)
    keep = fractions >= spec.min_tissue if spec.min_tissue > 0 else np.ones(len(coords), bool)
    n_cols = len(np.unique(coords[:, 0])) if len(coords) else 0
    flat = np.flatnonzero(keep)
    cells = np.stack([flat // max(n_cols, 1), flat % max(n_cols, 1)], axis=1).astype(np.int64)
    result = SlidePlan(meta, plan, coords[keep], fractions[keep], cells, int(len(coords)))
    if preview_dir:
        write_preview(os.path.join(preview_dir, f"{preview_name}.png"), thumb, mask, mask_ds, result)
    return result


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def write_preview(path: str, thumb: np.ndarray, mask: np.ndarray, mask_ds: float, sp: SlidePlan) -> None:
    """Thumbnail with the tissue outline (green) and kept patches (blue), for a glance check."""
    canvas = cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, (0, 200, 0), 1)
    side = sp.plan.patch_size_level0 / mask_ds
    for x, y in sp.coords:
        p0 = (int(x / mask_ds), int(y / mask_ds))
        p1 = (int(x / mask_ds + side) - 1, int(y / mask_ds + side) - 1)
        cv2.rectangle(canvas, p0, p1, (255, 80, 0), 1)
    if not cv2.imwrite(path, canvas):
        raise SlideError(f"{path}: cannot write the preview PNG; check --preview")


def plan_blocks(sp: SlidePlan, block_pixels: int = BLOCK_PIXELS) -> list[np.ndarray]:
    """Split kept patches into square blocks of grid cells; each block is one region read.

    Returns arrays of indices into ``sp.coords``, in row-major block order.
    """
    if len(sp.coords) == 0:
        return []
    cells_per_block = max(1, int(block_pixels // max(sp.plan.step_level, 1.0)))
    block_of = sp.grid_cells // cells_per_block
    key = block_of[:, 0] * (int(block_of[:, 1].max()) + 1) + block_of[:, 1]
    order = np.argsort(key, kind="stable")
    splits = np.flatnonzero(np.diff(key[order])) + 1
    return np.split(order, splits)


def read_block(path: str, plan: PatchPlan, coords: np.ndarray, spec: TileSpec):
    """Read the region covering ``coords`` once and cut, resize and encode its patches."""
    try:
        slide = cached_slide(path)
        ds = plan.level_downsample
        level_xy = np.round(coords / ds).astype(np.int64)
        x0, y0 = level_xy.min(axis=0)
        x1, y1 = level_xy.max(axis=0) + plan.read_size
        region = read_rgb(
            slide, (int(round(x0 * ds)), int(round(y0 * ds))), plan.level, (int(x1 - x0), int(y1 - y0))
        )
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"{path}: cannot be read ({_first_line(exc)}); re-export or remove it") from None
    patches = []
    size = plan.read_size
    for lx, ly in level_xy:
        patch = region[ly - y0 : ly - y0 + size, lx - x0 : lx - x0 + size]
        if size != plan.patch_size:
            patch = cv2.resize(patch, (plan.patch_size, plan.patch_size), interpolation=cv2.INTER_AREA)
        patches.append(np.ascontiguousarray(patch))
    return encode_patches(patches, spec.codec, spec.jpeg_quality)


def read_patch_direct(slide, plan: PatchPlan, x: int, y: int) -> np.ndarray:
    """One patch by its own ``read_region`` call: the reference the block reader must match."""
    patch = read_rgb(slide, (int(x), int(y)), plan.level, (plan.read_size, plan.read_size))
    if plan.read_size != plan.patch_size:
        patch = cv2.resize(patch, (plan.patch_size, plan.patch_size), interpolation=cv2.INTER_AREA)
    return patch
