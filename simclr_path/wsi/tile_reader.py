"""Per-slide work done in tiling workers: fingerprinting and planning a slide, and cutting runs of
patches from it.

All three are top-level and take plain data so a process pool can run them. A worker keeps
its open slides in a small cache; OpenSlide handles never cross processes.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
import openslide

from simclr_path.errors import SlideError, first_line
from simclr_path.store.codecs import encode_patches
from simclr_path.wsi.grid import PatchPlan, TileSpec, grid_coords, plan_patches
from simclr_path.wsi.preview import legend_text, write_preview
from simclr_path.wsi.qc import batch_scores
from simclr_path.wsi.slide import SlideMeta, fingerprint, open_slide, read_meta, read_rgb
from simclr_path.wsi.tissue import mask_downsample, thumbnail, tissue_fractions, tissue_mask

#: Longest row run read as one strip, and most patches in one worker task.
RUN_PATCHES = 16
TASK_PATCHES = 64
#: OpenSlide tile cache per worker process (bytes); holds the tiles shared by neighbouring strips.
SLIDE_CACHE_BYTES = 64 << 20

_open_slides: "OrderedDict[str, object]" = OrderedDict()


def worker_init(parent_pid: int) -> None:
    """Pool initializer: die with the tiling process, even when it is killed with SIGKILL.

    Without this, ``kill -9`` of ``simclr-path tile`` leaves its reader processes running idle
    (a few hundred MiB each). Linux's PR_SET_PDEATHSIG does it; elsewhere we rely on the pool.
    """
    import signal

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def cached_slide(path: str):
    """An OpenSlide handle for ``path``, kept open across tasks in this process (up to 4)."""
    slide = _open_slides.pop(path, None)
    if slide is None:
        slide = open_slide(path)
        _set_cache(slide)
    _open_slides[path] = slide
    while len(_open_slides) > 4:
        _open_slides.popitem(last=False)[1].close()
    return slide


_cache = None


def _set_cache(slide) -> None:
    """One larger tile cache shared by this process's slides (OpenSlide >= 4, if available)."""
    global _cache
    try:
        if _cache is None:
            _cache = openslide.OpenSlideCache(SLIDE_CACHE_BYTES)
        slide.set_cache(_cache)
    except (AttributeError, openslide.OpenSlideError):  # older OpenSlide: keep its default cache
        pass


def fingerprint_slide(path: str) -> str:
    """The slide's content fingerprint (:func:`~simclr_path.wsi.slide.fingerprint`), computed in a
    worker: on network storage its three reads are latency, so workers overlap them with tiling."""
    try:
        return fingerprint(path)
    except FileNotFoundError:
        raise SlideError(f"{path}: no such file; check the path") from None
    except PermissionError:
        raise SlideError(f"{path}: permission denied; check the file's permissions") from None
    except IsADirectoryError:
        raise SlideError(f"{path}: is a folder, not a slide file") from None
    except OSError as exc:
        raise SlideError(f"{path}: cannot be read ({exc.strerror or first_line(exc)}); check the file") from None


@dataclass
class SlidePlan:
    """A slide ready to be cut: what it is, how, and which patches to keep."""

    meta: SlideMeta
    plan: PatchPlan
    coords: np.ndarray  # (N, 2) int64 level-0 top-left of kept patches
    tissue_fraction: np.ndarray  # (N,) float32
    grid_cells: np.ndarray  # (N, 2) int64 (row, col) of kept patches in the full grid
    grid_total: int  # patches in the full grid before tissue filtering
    mask: np.ndarray | None = None  # tissue mask, kept for a preview drawn once QC flags are known


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
        raise SlideError(f"{path}: cannot be read ({first_line(exc)}); re-export or remove it") from None
    mask = tissue_mask(thumb)
    fractions = tissue_fractions(mask, mask_ds, coords, plan.patch_size_level0)
    keep = fractions >= spec.min_tissue if spec.min_tissue > 0 else np.ones(len(coords), bool)
    n_cols = len(np.unique(coords[:, 0])) if len(coords) else 0
    flat = np.flatnonzero(keep)
    cells = np.stack([flat // max(n_cols, 1), flat % max(n_cols, 1)], axis=1).astype(np.int64)
    result = SlidePlan(meta, plan, coords[keep], fractions[keep], cells, int(len(coords)))
    if preview_dir and spec.qc and len(result.coords):  # the tiler draws it once QC flags are known
        result.mask = mask
    elif preview_dir:
        legend = legend_text(preview_name, meta.mpp, plan.target_mpp, plan.patch_size, len(result.coords),
                             result.grid_total)
        write_preview(os.path.join(preview_dir, f"{preview_name}.png"), slide, mask, result.coords,
                      plan.patch_size_level0, legend)
    return result


def plan_tasks(sp: SlidePlan, max_run: int = RUN_PATCHES, max_task: int = TASK_PATCHES) -> list[np.ndarray]:
    """Group kept patches into tasks of row runs; each run is read as one strip.

    A run is a stretch of kept patches on consecutive grid columns of one row (at most
    ``max_run``), so only tissue is decoded; a task packs whole runs in row-major order (at most
    ``max_task`` patches), so one worker reads vertically neighbouring strips while OpenSlide's
    tile cache still holds their shared tiles. Returns arrays of indices into ``sp.coords``.
    """
    n = len(sp.coords)
    if n == 0:
        return []
    rows, cols = sp.grid_cells[:, 0], sp.grid_cells[:, 1]
    breaks = np.flatnonzero((np.diff(rows) != 0) | (np.diff(cols) != 1)) + 1
    runs = []
    for run in np.split(np.arange(n), breaks):
        runs.extend(run[i : i + max_run] for i in range(0, len(run), max_run))
    tasks, current = [], []
    for run in runs:
        if current and sum(map(len, current)) + len(run) > max_task:
            tasks.append(np.concatenate(current))
            current = []
        current.append(run)
    tasks.append(np.concatenate(current))
    return tasks


def split_runs(coords: np.ndarray, step_level0: float) -> list[slice]:
    """Runs of neighbouring patches on one row (same y, x one grid step apart) in a task."""
    dx = np.diff(coords[:, 0])
    breaks = np.flatnonzero((np.diff(coords[:, 1]) != 0) | (dx <= 0) | (dx > 1.5 * step_level0)) + 1
    edges = [0, *breaks.tolist(), len(coords)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def read_task(path: str, plan: PatchPlan, coords: np.ndarray, spec: TileSpec):
    """Read each row run of ``coords`` as one strip, then cut, resize and encode its patches.

    Returns ``(encoded patches, QC scores)``: the scores are an (N, K) float32 array of
    :func:`~simclr_path.wsi.qc.batch_scores` of the stored pixels, or None when ``spec.qc`` is off.
    """
    ds, size = plan.level_downsample, plan.read_size
    patches = []
    try:
        slide = cached_slide(path)
        for run in split_runs(coords, plan.step_level * ds):
            level_xy = np.round(coords[run] / ds).astype(np.int64)
            x0, y0 = level_xy[0]
            width = int(level_xy[-1, 0] - x0 + size)
            strip = read_rgb(slide, (int(coords[run][0, 0]), int(coords[run][0, 1])), plan.level, (width, size))
            for lx in level_xy[:, 0] - x0:
                patch = strip[:, lx : lx + size]
                if size != plan.patch_size:
                    patch = cv2.resize(patch, (plan.patch_size, plan.patch_size), interpolation=cv2.INTER_AREA)
                patches.append(np.ascontiguousarray(patch))
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"{path}: cannot be read ({first_line(exc)}); re-export or remove it") from None
    scores = None
    if spec.qc:
        scores = batch_scores(patches)
    return encode_patches(patches, spec.codec, spec.jpeg_quality), scores


def read_patch_direct(slide, plan: PatchPlan, x: int, y: int) -> np.ndarray:
    """One patch by OpenSlide's public ``read_region`` alone: what a stored patch must equal."""
    region = slide.read_region((int(x), int(y)), plan.level, (plan.read_size, plan.read_size))
    patch = np.asarray(region.convert("RGB"))
    if plan.read_size != plan.patch_size:
        patch = cv2.resize(patch, (plan.patch_size, plan.patch_size), interpolation=cv2.INTER_AREA)
    return patch
