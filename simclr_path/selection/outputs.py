"""What ``select`` writes, for a pathologist to open: GeoJSON for QuPath, one CSV, thumbnails.

``DIR/<slide>.geojson``: for every slide with at least one proposed region, a FeatureCollection
of the regions as rectangles in level-0 pixels, ready for QuPath (File > Import objects):
``objectType`` annotation, class "Annotate next" with its colour, name "rank N", measurements
rank, score and area_um2 (null when the slide's mpp is unknown or the strategy has no score).
``DIR/regions.csv``: ``slide,rank,x,y,width,height,score``, one row per proposed region in rank
order over all slides (level-0 pixels; score empty when NaN).
``DIR/<slide>.thumbnail.png``: the slide composed from its stored patches (long side about
:data:`THUMBNAIL_LONG_SIDE` pixels, white where no patch is), the regions drawn and numbered. Not
``<slide>.png``, the name of a label mask: the folder can be given back to ``select --annotated``
and ``segment --labels``, which never read thumbnails as masks.

Ranks are global over all slides: rank 1 is the best region of the whole run.

Nothing is half-written: every file is made in a temporary folder next to DIR and renamed into
DIR only once all were made. A slide's proposals from an earlier run into the same DIR that this
run no longer has are removed, so the GeoJSON files always agree with regions.csv.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile

import cv2
import numpy as np

from simclr_path.annotations.geojson import (
    ANNOTATE_NEXT, ANNOTATE_NEXT_COLOR, annotation_feature, read_annotations, write_geojson,
)
from simclr_path.errors import SimclrPathError
from simclr_path.runtime.files import write_png
from simclr_path.segment.masks import THUMBNAIL_SUFFIX
from simclr_path.selection.regions import Regions, SlideGrid, slide_coords
from simclr_path.store import PatchStore
from simclr_path.store.format import SLIDES, open_h5

#: The class colour in QuPath and the boxes' colour in the thumbnails (RGB): green, the complement
#: of H&E's pinks and purples, and clear on white glass.
ANNOTATE_COLOR = ANNOTATE_NEXT_COLOR
THUMBNAIL_LONG_SIDE = 1280
CSV_NAME = "regions.csv"
_INK = (30, 30, 30)


def write_outputs(out: str, regions: Regions, ranked: np.ndarray, scores: np.ndarray, store: PatchStore,
                  legend: str = "") -> list[str]:
    """Write the proposals of ``ranked`` (best first) into ``out``; returns the file names written."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise SimclrPathError(f"{out}: cannot create the output folder ({exc.strerror or exc}); choose an --out "
                              "you can write") from None
    ranks = np.arange(1, len(ranked) + 1)
    try:
        names = [CSV_NAME]
        _write_csv(os.path.join(staging, CSV_NAME), regions, ranked, ranks, scores)
        for number, slide in enumerate(regions.slides):
            on_slide = regions.slide[ranked] == number
            if not on_slide.any():
                continue
            geojson, png = f"{slide.file_name}.geojson", f"{slide.file_name}{THUMBNAIL_SUFFIX}"
            write_geojson(os.path.join(staging, geojson),
                          region_features(regions, ranked[on_slide], ranks[on_slide], scores[on_slide]))
            image = draw_thumbnail(store, regions, number, ranked[on_slide], ranks[on_slide],
                                   f"{slide.file_name} | {legend}" if legend else slide.file_name)
            write_png(os.path.join(staging, png), cv2.cvtColor(image, cv2.COLOR_BGR2RGB))  # drawn in BGR
            names += [geojson, png]
        os.makedirs(out, exist_ok=True)
        _remove_stale_proposals(out, regions, set(names))
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    except OSError as exc:
        raise SimclrPathError(f"{out}: cannot write the proposals ({exc.strerror or exc}); choose an --out you can "
                              "write") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


def region_features(regions: Regions, indices: np.ndarray, ranks: np.ndarray, scores: np.ndarray) -> list[dict]:
    """QuPath annotation features of the regions ``indices`` (level-0 rectangles)."""
    features = []
    for index, rank, score in zip(indices, ranks, scores):
        x, y, w, h = (int(v[index]) for v in (regions.x, regions.y, regions.width, regions.height))
        features.append(annotation_feature(
            [[x, y], [x + w, y], [x + w, y + h], [x, y + h]], classification=ANNOTATE_NEXT, color=ANNOTATE_COLOR,
            name=f"rank {rank}",
            measurements={"rank": int(rank), "score": float(score), "area_um2": float(regions.area_um2[index])}))
    return features


def _write_csv(path: str, regions: Regions, ranked: np.ndarray, ranks: np.ndarray, scores: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "rank", "x", "y", "width", "height", "score"])
        for index, rank, score in zip(ranked, ranks, scores):
            writer.writerow([regions.slides[regions.slide[index]].file_name, int(rank), int(regions.x[index]),
                             int(regions.y[index]), int(regions.width[index]), int(regions.height[index]),
                             "" if math.isnan(score) else f"{score:.6g}"])


def thumbnail_downsample(slide: SlideGrid, extent: tuple[int, int], patch_size: int) -> float:
    """Level-0 pixels per thumbnail pixel: the long side about :data:`THUMBNAIL_LONG_SIDE` pixels,
    never finer than the stored patches."""
    return max(max(extent) / THUMBNAIL_LONG_SIDE, slide.patch0 / patch_size)


def draw_thumbnail(store: PatchStore, regions: Regions, number: int, indices: np.ndarray, ranks: np.ndarray,
                   legend: str = "") -> np.ndarray:
    """BGR thumbnail of slide ``number`` from its stored patches, regions ``indices`` boxed and numbered."""
    slide = regions.slides[number]
    coords = slide_coords(slide)
    on_slide = regions.of_slide(number)  # all regions of the slide, so the canvas holds every box whole
    width = max(slide.width, math.ceil(coords[:, 0].max() + slide.patch0),
                int((regions.x[on_slide] + regions.width[on_slide]).max(initial=0)))
    height = max(slide.height, math.ceil(coords[:, 1].max() + slide.patch0),
                 int((regions.y[on_slide] + regions.height[on_slide]).max(initial=0)))
    d = thumbnail_downsample(slide, (width, height), store.patch_size)
    canvas = np.full((math.ceil(height / d), math.ceil(width / d), 3), 255, np.uint8)
    side = slide.patch0 / d  # a patch's side in the thumbnail
    for local, patch in _patches_bgr(store, slide, side):
        x, y = coords[local]
        x0, y0 = int(x / d), int(y / d)  # rounded outwards: no seams between neighbouring patches
        x1 = min(math.ceil((x + slide.patch0) / d), canvas.shape[1])
        y1 = min(math.ceil((y + slide.patch0) / d), canvas.shape[0])
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = cv2.resize(patch, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    color = ANNOTATE_COLOR[::-1]
    thickness = max(2, round(max(canvas.shape[:2]) / 500))
    for index, rank in zip(indices, ranks):
        x0, y0 = int(round(regions.x[index] / d)), int(round(regions.y[index] / d))
        x1 = int(round((regions.x[index] + regions.width[index]) / d)) - 1
        y1 = int(round((regions.y[index] + regions.height[index]) / d)) - 1
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, thickness)
        scale = max(0.4, min(1.2, (x1 - x0) / 60))
        (_, text_h), _ = cv2.getTextSize(str(rank), cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
        origin = (x0 + thickness + 2, y0 + thickness + 2 + text_h)
        cv2.putText(canvas, str(rank), origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 5, cv2.LINE_AA)
        cv2.putText(canvas, str(rank), origin, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 2, cv2.LINE_AA)
    return _with_legend(canvas, legend) if legend else canvas


def _patches_bgr(store: PatchStore, slide: SlideGrid, side: float):
    """``(local index, BGR patch)`` of every patch of ``slide``, at least ``side`` px wide.

    JPEG patches are read in slices and decoded at 1/2, 1/4 or 1/8 size when that is still at least
    ``side`` (libjpeg scales while decoding: several times faster for a thumbnail of a big slide)."""
    if store.codecs[store.paths.index(slide.store)] != "jpeg":
        for local in range(slide.end - slide.start):
            yield local, cv2.cvtColor(store[slide.start + local], cv2.COLOR_RGB2BGR)
        return
    factor = next((f for f in (8, 4, 2) if store.patch_size / f >= side), 1)
    flag = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2,
            1: cv2.IMREAD_COLOR}[factor]
    with open_h5(slide.store, "r") as f:
        pixels = f[SLIDES][slide.name]["patches"]
        for first in range(0, pixels.shape[0], 4096):
            for offset, encoded in enumerate(pixels[first:first + 4096]):
                patch = cv2.imdecode(np.asarray(encoded, dtype=np.uint8), flag)
                if patch is None:
                    raise SimclrPathError(f"{slide.store}: a corrupt JPEG patch in slide {slide.name}; re-tile "
                                          "the slide")
                yield first + offset, patch


def _with_legend(canvas: np.ndarray, legend: str) -> np.ndarray:
    h, w = canvas.shape[:2]
    scale = max(0.4, min(0.8, w / 1600))
    (tw, th), base = cv2.getTextSize(legend, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    fit = min(1.0, (w - 16) / max(tw, 1))  # a long legend still fits on one line
    band = int((th + base) * fit) + 16
    out = np.full((h + band, w, 3), 255, np.uint8)
    out[:h] = canvas
    cv2.putText(out, legend, (8, h + band - int(base * fit) - 8), cv2.FONT_HERSHEY_SIMPLEX, scale * fit, _INK, 1,
                cv2.LINE_AA)
    return out


def _remove_stale_proposals(out: str, regions: Regions, written: set[str]) -> None:
    """Remove an earlier run's proposals for slides this run proposes nothing on (only files that
    are proposals: GeoJSON whose objects are all "Annotate next", and the thumbnail beside it)."""
    for slide in regions.slides:
        geojson = f"{slide.file_name}.geojson"
        path = os.path.join(out, geojson)
        if geojson in written or not os.path.isfile(path):
            continue
        try:
            annotations, _ = read_annotations(path)
        except SimclrPathError:
            continue
        if annotations and all(a.classification == ANNOTATE_NEXT for a in annotations):
            os.remove(path)
            for png in (f"{slide.file_name}{THUMBNAIL_SUFFIX}", f"{slide.file_name}.png"):  # and an older run's
                if os.path.isfile(os.path.join(out, png)) and (png.endswith(THUMBNAIL_SUFFIX) or _is_thumbnail(
                        os.path.join(out, png))):
                    os.remove(os.path.join(out, png))


def _is_thumbnail(path: str) -> bool:
    """Whether an older ``<slide>.png`` is a thumbnail (colour) rather than a label mask (one channel)."""
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    return image is not None and image.ndim == 3
