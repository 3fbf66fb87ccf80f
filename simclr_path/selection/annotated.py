"""Which regions are already annotated, from a folder of QuPath GeoJSON exports and label masks.

The folder holds, per slide, ``<slide>.geojson`` (QuPath annotations in level-0 pixels) and/or
``<slide>.png`` (a label mask: one class index per pixel, 255 = unlabelled, at level 0 or at a
downsample inferred from the mask's size against the slide's level-0 size). ``<slide>`` is the
slide's output name as ``select`` and ``embed`` write it. Other files are ignored; a ``.geojson``
or ``.png`` naming no slide of the stores is an error.

A region is annotated when a labelled pixel's centre lies in its level-0 box:

- masks: any non-255 pixel;
- GeoJSON: any pixel of the polygons rasterised at a quarter of the grid step (all classes alike,
  pixel-centre rule of :func:`~simclr_path.annotations.geojson.rasterize`); a polygon too small to
  cover a pixel centre marks the pixel under the middle of its bounding box, so it still counts.
  A box that only touches a region's edge (the previous round's proposal, re-imported) does not
  mark that neighbour.
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np

from simclr_path.annotations.geojson import Annotation, rasterize, read_annotations
from simclr_path.errors import SimclrPathError
from simclr_path.segment.masks import IGNORE, mask_downsample, read_class_mask
from simclr_path.selection.regions import Regions, SlideGrid

#: Raster resolution for GeoJSON, in pixels per grid step.
PIXELS_PER_STEP = 4
#: Largest side of a GeoJSON raster in pixels (coarser for a giant slide with a fine grid).
MAX_RASTER_SIDE = 16384


def annotated_regions(folder: str, regions: Regions, log=None) -> np.ndarray:
    """(R,) bool: True for regions of ``regions`` that ``folder``'s annotations touch.

    Args:
        folder: the ``--annotated`` folder.
        regions: all regions of the stores.
        log: called with a line on stderr, e.g. the number of point or line objects skipped.
    """
    if not os.path.isdir(folder):
        raise SimclrPathError(f"{folder}: no such folder; give --annotated a folder of <slide>.geojson "
                              "(QuPath export) and/or <slide>.png label masks")
    by_name = {slide.file_name: number for number, slide in enumerate(regions.slides)}
    annotated = np.zeros(len(regions), dtype=bool)
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in (".geojson", ".png") or not entry.is_file():
            continue
        if stem not in by_name:
            known = ", ".join(sorted(by_name)[:5]) + (", ..." if len(by_name) > 5 else "")
            raise SimclrPathError(f"{entry.path}: names no slide of these stores ({known}); name it "
                                  f"<slide>{ext.lower()} or move it out of {folder}")
        number = by_name[stem]
        slide = regions.slides[number]
        if ext.lower() == ".geojson":
            labelled, downsample = _geojson_raster(entry.path, slide, regions, number, log)
        else:
            labelled, downsample = _mask_raster(entry.path, slide)
        indices = regions.of_slide(number)
        annotated[indices] |= _touched(labelled, downsample, regions, indices)
    return annotated


def _extent(slide: SlideGrid, regions: Regions, number: int) -> tuple[int, int]:
    """Level-0 (width, height) covering the slide and all its regions."""
    indices = regions.of_slide(number)
    width = max(slide.width, int((regions.x[indices] + regions.width[indices]).max(initial=0)))
    height = max(slide.height, int((regions.y[indices] + regions.height[indices]).max(initial=0)))
    return width, height


def _geojson_raster(path: str, slide: SlideGrid, regions: Regions, number: int, log) -> tuple[np.ndarray, float]:
    annotations, skipped = read_annotations(path)
    if skipped and log is not None:
        log(f"{path}: skipped " + ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
            + " object(s); only polygons mark regions as annotated")
    width, height = _extent(slide, regions, number)
    downsample = max(1.0, slide.step0 / PIXELS_PER_STEP, max(width, height) / MAX_RASTER_SIDE)
    size = (math.ceil(width / downsample), math.ceil(height / downsample))
    labelled = np.zeros((size[1], size[0]), dtype=np.uint8)
    for annotation in annotations:
        for polygon in annotation.polygons:
            _mark(labelled, Annotation(annotation.classification, (polygon,)), downsample, path)
    return labelled, downsample


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


def _mask_raster(path: str, slide: SlideGrid) -> tuple[np.ndarray, float]:
    mask = read_class_mask(path)
    if not slide.width or not slide.height:
        raise SimclrPathError(f"{path}: the store does not record the level-0 size of slide {slide.name}; "
                              "re-tile it with this version of simclr-path")
    downsample = mask_downsample(path, mask.shape, slide.name, slide.width, slide.height)
    return (mask != IGNORE).astype(np.uint8), downsample


def _touched(labelled: np.ndarray, downsample: float, regions: Regions, indices: np.ndarray) -> np.ndarray:
    """For each region, whether a labelled pixel's centre lies in its box (integral image, O(1) each)."""
    height, width = labelled.shape
    total = cv2.integral(labelled)  # (height + 1, width + 1) int32
    x0, y0 = regions.x[indices], regions.y[indices]
    x1, y1 = x0 + regions.width[indices], y0 + regions.height[indices]

    def pixel_range(start, stop, size):  # pixels whose centre (i + 0.5) * d lies in [start, stop)
        first = np.ceil(start / downsample - 0.5).astype(np.int64)
        last = np.ceil(stop / downsample - 0.5).astype(np.int64)
        centre = np.floor((start + stop) / 2 / downsample).astype(np.int64)  # a box narrower than a pixel
        first, last = np.where(last > first, first, centre), np.where(last > first, last, centre + 1)
        return np.clip(first, 0, size), np.clip(last, 0, size)

    c0, c1 = pixel_range(x0, x1, width)
    r0, r1 = pixel_range(y0, y1, height)
    return (total[r1, c1] - total[r0, c1] - total[r1, c0] + total[r0, c0]) > 0
