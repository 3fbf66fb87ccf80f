"""Regions: the squares of patches a pathologist is asked to annotate.

Each slide's patches lie on the tiling grid: grid step ``step0 = stride * scale`` level-0 pixels
(``stride`` in target pixels, the store's root attribute, the patch size when unset; ``scale`` in
level-0 pixels per target pixel, the slide's attribute), so a patch at level-0 ``(x, y)`` sits in
grid cell ``(round(x / step0), round(y / step0))``.

A region is a block of K x K grid cells, the blocks aligned to multiples of K and never
overlapping. A block is a region when at least half of its K * K cells hold a stored (tissue)
patch: ``2 * stored >= K * K``. A patch the store's ``exclude_qc`` leaves out (tiling QC: pen ink,
blur) counts as an empty cell and is no member of any region. Blocks at the slide's edge count their cells outside the slide as
empty, so a mostly-cut-off block is not proposed. With K = 1 every patch is a region.

A region's box in level-0 pixels starts at the block's origin ``(bx * K * step0, by * K * step0)``
and is ``(K - 1) * step0 + patch_size * scale`` wide and high: the extent of a full block of
patches. Its area in um^2 uses the slide's level-0 microns per pixel (NaN when unknown).

Everything is held in flat arrays (one entry per region, plus the member patches of all regions
in one index array with offsets), so a million patches cost a few tens of MB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simclr_path.errors import SimclrPathError
from simclr_path.store import PatchStore
from simclr_path.store.format import SLIDES, open_h5


@dataclass(frozen=True)
class SlideGrid:
    """One slide's tiling grid.

    Attributes:
        name: the slide's name in its store.
        file_name: the stem of the slide's output files, its key in the stores: the name, or
            ``<name>-<store stem>`` when several stores have a slide of that name.
        store: path of the store holding it.
        start, end: its patches' indices in the :class:`PatchStore`.
        width, height: level-0 size in pixels.
        level0_mpp: microns per level-0 pixel (NaN when unknown).
        step0: grid step in level-0 pixels.
        patch0: patch side in level-0 pixels.
    """

    name: str
    file_name: str
    store: str
    start: int
    end: int
    width: int
    height: int
    level0_mpp: float
    step0: float
    patch0: float


@dataclass(frozen=True)
class Regions:
    """All regions of a :class:`PatchStore`, slide by slide in store order, row-major in a slide.

    Attributes:
        size: K, the region side in patches.
        slides: the slides, in store order.
        slide: (R,) index into ``slides`` of each region's slide.
        x, y, width, height: (R,) int64 level-0 box of each region (top-left, size).
        area_um2: (R,) float64 box area in um^2 (NaN when the slide's mpp is unknown).
        offsets: (R + 1,) int64; region r's patches are ``members[offsets[r]:offsets[r + 1]]``.
        members: int64 patch indices into the :class:`PatchStore`, grouped by region.
    """

    size: int
    slides: tuple[SlideGrid, ...]
    slide: np.ndarray
    x: np.ndarray
    y: np.ndarray
    width: np.ndarray
    height: np.ndarray
    area_um2: np.ndarray
    offsets: np.ndarray
    members: np.ndarray

    def __len__(self) -> int:
        return len(self.slide)

    def patch_region(self) -> np.ndarray:
        """(len(members),) region index of each entry of ``members``."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.offsets))

    def of_slide(self, slide: int) -> np.ndarray:
        """Indices of the regions of ``slides[slide]`` (a contiguous range: regions go slide by slide)."""
        return np.arange(*np.searchsorted(self.slide, [slide, slide + 1]))


def build_regions(store: PatchStore, size: int) -> Regions:
    """The regions of K x K = ``size`` x ``size`` patches of every slide of ``store``."""
    if size < 1:
        raise SimclrPathError(f"--region-size must be >= 1 patch, got {size}")
    columns = {k: [] for k in ("slide", "x", "y", "width", "height", "area_um2", "counts", "members")}
    slides = []
    included = store.included()
    for number, (grid, coords) in enumerate(_slide_grids(store)):
        slides.append(grid)
        local = np.flatnonzero(included[grid.start:grid.end])  # patches QC leaves out are empty cells
        if len(local) == 0:
            continue
        coords = coords[local]
        cells = np.rint(coords / grid.step0).astype(np.int64)
        blocks = cells // size
        cell_columns, block_columns = int(cells[:, 0].max()) + 1, int(blocks[:, 0].max()) + 1
        # row-major keys: a block's key orders blocks by (row, column)
        block_keys, block_of_patch, counts = np.unique(blocks[:, 1] * block_columns + blocks[:, 0],
                                                       return_inverse=True, return_counts=True)
        stored = np.unique(cells[:, 1] * cell_columns + cells[:, 0])  # each stored cell once
        stored_block = (stored // cell_columns // size) * block_columns + stored % cell_columns // size
        cells_stored = np.bincount(np.searchsorted(block_keys, stored_block), minlength=len(block_keys))
        kept = 2 * cells_stored >= size * size
        order = np.argsort(block_of_patch, kind="stable")  # patches grouped by block, blocks row-major
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        block_x, block_y = blocks[order[first], 0], blocks[order[first], 1]
        side = round((size - 1) * grid.step0 + grid.patch0)
        n_kept = int(kept.sum())
        columns["slide"].append(np.full(n_kept, number, dtype=np.int32))
        columns["x"].append(np.rint(block_x[kept] * size * grid.step0).astype(np.int64))
        columns["y"].append(np.rint(block_y[kept] * size * grid.step0).astype(np.int64))
        columns["width"].append(np.full(n_kept, side, dtype=np.int64))
        columns["height"].append(np.full(n_kept, side, dtype=np.int64))
        columns["area_um2"].append(np.full(n_kept, side * side * grid.level0_mpp ** 2, dtype=np.float64))
        columns["counts"].append(counts[kept])
        columns["members"].append(grid.start + local[order[kept[block_of_patch[order]]]])
    if not slides:
        raise SimclrPathError(f"{', '.join(store.paths)}: no patches; tile slides into the store first")
    if not columns["counts"]:
        raise SimclrPathError(f"{', '.join(store.paths)}: every patch is flagged {','.join(store.exclude_qc)} by QC; "
                              "propose regions from them anyway with --exclude-qc none")
    counts = np.concatenate(columns.pop("counts"))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Regions(size=size, slides=tuple(slides), offsets=offsets,
                   **{k: np.concatenate(v) for k, v in columns.items()})


def slide_coords(slide: SlideGrid) -> np.ndarray:
    """(N, 2) int64 level-0 top-left (x, y) of the slide's patches, in store order."""
    with open_h5(slide.store, "r") as f:
        return f[SLIDES][slide.name]["coords"][()].reshape(-1, 2)


def _slide_grids(store: PatchStore):
    """``(SlideGrid, (N, 2) float64 level-0 coords)`` of every slide of ``store``, in store order.

    Output names follow ``embed``: the slide's name, or ``<name>-<store file stem>`` (then ``-2``,
    ``-3``...) when an earlier store already has a slide of that name.
    """
    ranges = iter(store.slide_ranges())
    for path, attrs in zip(store.paths, store.attrs):
        patch_size = float(attrs["patch_size"])
        stride = float(attrs.get("stride", math.nan))
        stride = stride if stride > 0 else patch_size
        with open_h5(path, "r") as f:
            for name, group in f[SLIDES].items():
                coords = group["coords"][()].astype(np.float64).reshape(-1, 2)
                if len(coords) == 0:
                    continue
                key, start, end = next(ranges, (None, 0, 0))
                if key is None or store.slide_source(key)[1] != name or end - start != len(coords):
                    raise SimclrPathError(f"{path}: the store changed while being read; rerun when it is complete")
                scale = float(group.attrs.get("scale", math.nan))
                if (coords < 0).any() or not scale > 0:
                    raise SimclrPathError(f"{path}: slide {name} has no slide coordinates (an ingested image "
                                          "folder?); select regions in stores made by 'simclr-path tile'")
                file_name = key
                mpp = float(group.attrs.get("level0_mpp", math.nan))
                grid = SlideGrid(name=name, file_name=file_name, store=path, start=start, end=end,
                                 width=int(group.attrs.get("width", 0)), height=int(group.attrs.get("height", 0)),
                                 level0_mpp=mpp if mpp > 0 else math.nan, step0=stride * scale,
                                 patch0=patch_size * scale)
                yield grid, coords
