"""Which regions are already annotated, from a folder of QuPath GeoJSON exports and label masks.

The folder holds, per slide, ``<slide>.geojson`` (QuPath annotations in level-0 pixels) and/or
``<slide>.png`` (any case; a label mask read in the folder's mask format, see
:mod:`simclr_path.segment.masks`: 255 = unlabelled for class-index masks, every pixel labelled
for binary 0/255 masks), at level 0 or at a downsample inferred from the mask's size against the
slide's level-0 size. ``<slide>`` is the slide's key as ``select``, ``predict`` and ``embed`` name
their files. ``select`` thumbnails (``<slide>.thumbnail.png``) and other files are ignored; a
``.geojson`` or ``.png`` naming no slide of the stores is skipped with a warning.

Each region owns a *core*: the K x K grid cells it was built from, ``K * step0`` level-0 pixels a
side from its origin. Cores never overlap, even when the patches do (``tile --overlap``), while the
region's box (the extent of its patches) reaches into its neighbours' cores there. So:

- a proposed square ("Annotate next", as ``select`` wrote it) with a drawing in it marks exactly the
  region whose core holds the square's centre: the region it was proposed for. A drawing belongs to
  the square holding its centre (the nearest one where squares overlap), as ``segment`` reads it;
- a square left untouched marks nothing (``segment`` does not label it either, so it may be
  proposed again); how many came back so is said on stderr;
- any other polygon, and any labelled mask pixel, marks the regions whose core holds a labelled
  pixel's centre (polygons rasterised at a quarter of the grid step, all classes alike; a polygon
  too small to cover a pixel centre marks the pixel under the middle of its bounding box).

A folder in which no file names a slide of the stores, or a GeoJSON without a polygon, is refused.
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np

from simclr_path.annotations.geojson import (
    ANNOTATE_NEXT, Annotation, bounds, rasterize, read_annotations, square_of_each,
)
from simclr_path.errors import SimclrPathError
from simclr_path.segment.masks import IGNORE, class_mask, decode_mask, is_mask_file, mask_downsample, \
    resolve_mask_format
from simclr_path.selection.regions import Regions, SlideGrid

#: Raster resolution for GeoJSON, in pixels per grid step.
PIXELS_PER_STEP = 4
#: Largest side of a GeoJSON raster in pixels (coarser for a giant slide with a fine grid).
MAX_RASTER_SIDE = 16384


def annotated_regions(folder: str, regions: Regions, log=None, mask_format: str = "auto") -> np.ndarray:
    """(R,) bool: True for regions of ``regions`` that ``folder``'s annotations mark (module docstring).

    Args:
        folder: the ``--annotated`` folder.
        regions: all regions of the stores.
        log: called with a line on stderr, e.g. the number of point or line objects skipped.
        mask_format: what the masks' values mean (``auto``, ``index``, ``binary``).
    """
    if not os.path.isdir(folder):
        raise SimclrPathError(f"{folder}: no such folder; give --annotated a folder of <slide>.geojson "
                              "(QuPath export) and/or <slide>.png label masks")
    log = log or (lambda line: None)
    by_name = {slide.file_name: number for number, slide in enumerate(regions.slides)}
    files, unknown = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        if entry.name.lower().endswith(".geojson"):
            kind, stem = "geojson", entry.name[: -len(".geojson")]
        elif is_mask_file(entry.name):
            kind, stem = "mask", entry.name[: -len(".png")]
        else:
            continue
        if stem in by_name:
            files.append((by_name[stem], entry.path, kind))
        else:
            unknown.append(entry.name)
    if unknown:
        log(f"warning: {folder}: skipped {len(unknown)} file(s) naming no slide of these stores "
            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}; slides: {_known_slides(by_name)})")
    if not files:
        raise SimclrPathError(
            f"{folder}: no <slide>.geojson or <slide>.png in it names a slide of these stores "
            f"({_known_slides(by_name)}); give --annotated the folder of QuPath exports (or label masks) named after "
            "the slides")
    decoded = {path: decode_mask(path) for _, path, kind in files if kind == "mask"}
    resolved, note = resolve_mask_format(mask_format, decoded)
    if note:
        log(f"{folder}: {note}")
    annotated = np.zeros(len(regions), dtype=bool)
    untouched = 0
    for number, path, kind in files:
        slide = regions.slides[number]
        indices = regions.of_slide(number)
        if kind == "geojson":
            labelled, downsample, proposed, empty = _geojson_raster(path, slide, regions, number, log)
            annotated[proposed] = True
            untouched += empty
        else:
            labelled, downsample = _mask_raster(path, slide, class_mask(decoded[path], resolved, mask_format != "auto"))
        annotated[indices] |= _touched(labelled, downsample, regions, indices)
    if untouched:
        log(f"{folder}: {untouched} proposed 'Annotate next' square(s) came back with nothing drawn in them: not "
            "annotated, so they can be proposed again")
    return annotated


def _known_slides(by_name: dict) -> str:
    return ", ".join(sorted(by_name)[:3]) + (", ..." if len(by_name) > 3 else "")


def _core(regions: Regions, indices: np.ndarray) -> np.ndarray:
    """(len(indices),) level-0 side of each region's core: its K grid cells, ``K * step0``."""
    step = np.array([regions.slides[s].step0 for s in regions.slide[indices]], dtype=np.float64)
    return np.rint(regions.size * step).astype(np.int64)


def _region_at(regions: Regions, indices: np.ndarray, x: float, y: float) -> int | None:
    """The region among ``indices`` whose core holds level-0 point (x, y), or None."""
    core = _core(regions, indices)
    hit = (regions.x[indices] <= x) & (x < regions.x[indices] + core) & (regions.y[indices] <= y) & (
        y < regions.y[indices] + core)
    found = np.flatnonzero(hit)
    return int(indices[found[0]]) if len(found) else None


def _extent(slide: SlideGrid, regions: Regions, number: int) -> tuple[int, int]:
    """Level-0 (width, height) covering the slide and all its regions."""
    indices = regions.of_slide(number)
    width = max(slide.width, int((regions.x[indices] + regions.width[indices]).max(initial=0)))
    height = max(slide.height, int((regions.y[indices] + regions.height[indices]).max(initial=0)))
    return width, height


def _geojson_raster(path: str, slide: SlideGrid, regions: Regions, number: int,
                    log) -> tuple[np.ndarray, float, list[int], int]:
    """``(raster of drawn polygons outside proposed squares, its downsample, regions of the proposed
    squares with a drawing in them, proposed squares left untouched)`` of one export."""
    annotations, skipped = read_annotations(path)
    if skipped:
        log(f"{path}: skipped " + ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
            + " object(s); only polygons mark regions as annotated")
    if not annotations:
        raise SimclrPathError(f"{path}: no polygon annotations; export the annotated squares from QuPath, or move "
                              "the file out of the --annotated folder")
    width, height = _extent(slide, regions, number)
    downsample = max(1.0, slide.step0 / PIXELS_PER_STEP, max(width, height) / MAX_RASTER_SIDE)
    size = (math.ceil(width / downsample), math.ceil(height / downsample))
    labelled = np.zeros((size[1], size[0]), dtype=np.uint8)
    squares = np.array([bounds(p) for a in annotations if a.classification == ANNOTATE_NEXT for p in a.polygons],
                       dtype=np.float64).reshape(-1, 4)
    drawn = [(a, p) for a in annotations if a.classification != ANNOTATE_NEXT for p in a.polygons]
    owner = square_of_each(np.array([bounds(p) for _, p in drawn], dtype=np.float64).reshape(-1, 4), squares)
    indices = regions.of_slide(number)
    proposed = []
    for square in np.unique(owner[owner >= 0]):
        x0, y0, x1, y1 = squares[square]
        region = _region_at(regions, indices, (x0 + x1) / 2, (y0 + y1) / 2)
        if region is not None:
            proposed.append(region)
    for (annotation, polygon), square in zip(drawn, owner):
        if square < 0:  # drawn outside every proposed square: it marks the regions it covers
            _mark(labelled, Annotation(annotation.classification, (polygon,)), downsample, path)
    return labelled, downsample, proposed, len(squares) - len(np.unique(owner[owner >= 0]))


def _mark(labelled: np.ndarray, polygon: Annotation, downsample: float, path: str) -> None:
    """Set the raster pixels of one polygon to 1; a polygon covering no pixel centre marks the pixel
    under the middle of its bounding box instead."""
    points = np.concatenate(polygon.polygons[0]) / downsample
    (col0, row0), (col1, row1) = np.floor(points.min(axis=0)).astype(int), np.floor(points.max(axis=0)).astype(int) + 1
    col0, row0 = max(col0, 0), max(row0, 0)
    col1, row1 = min(col1, labelled.shape[1]), min(row1, labelled.shape[0])
    if col1 <= col0 or row1 <= row0:
        return  # outside the slide
    window = rasterize([polygon], {polygon.classification: 1}, (col0 * downsample, row0 * downsample),
                       (col1 - col0, row1 - row0), downsample=downsample, fill=0, path=path)
    if window.any():
        labelled[row0:row1, col0:col1] |= window
    else:
        middle = (points.min(axis=0) + points.max(axis=0)) / 2
        col = int(np.clip(np.floor(middle[0]), col0, col1 - 1))
        row = int(np.clip(np.floor(middle[1]), row0, row1 - 1))
        labelled[row, col] = 1


def _mask_raster(path: str, slide: SlideGrid, mask: np.ndarray) -> tuple[np.ndarray, float]:
    if not slide.width or not slide.height:
        raise SimclrPathError(f"{path}: the store does not record the level-0 size of slide {slide.name}; "
                              "re-tile it with this version of simclr-path")
    downsample = mask_downsample(path, mask.shape, slide.name, slide.width, slide.height)
    return (mask != IGNORE).astype(np.uint8), downsample


def _touched(labelled: np.ndarray, downsample: float, regions: Regions, indices: np.ndarray) -> np.ndarray:
    """For each region, whether a labelled pixel's centre lies in its core (integral image, O(1) each)."""
    height, width = labelled.shape
    total = cv2.integral(labelled)  # (height + 1, width + 1) int32
    x0, y0 = regions.x[indices], regions.y[indices]
    core = _core(regions, indices)
    x1, y1 = x0 + core, y0 + core

    def pixel_range(start, stop, size):  # pixels whose centre (i + 0.5) * d lies in [start, stop)
        first = np.ceil(start / downsample - 0.5).astype(np.int64)
        last = np.ceil(stop / downsample - 0.5).astype(np.int64)
        centre = np.floor((start + stop) / 2 / downsample).astype(np.int64)  # a box narrower than a pixel
        first, last = np.where(last > first, first, centre), np.where(last > first, last, centre + 1)
        return np.clip(first, 0, size), np.clip(last, 0, size)

    c0, c1 = pixel_range(x0, x1, width)
    r0, r1 = pixel_range(y0, y1, height)
    return (total[r1, c1] - total[r0, c1] - total[r1, c0] + total[r0, c0]) > 0
