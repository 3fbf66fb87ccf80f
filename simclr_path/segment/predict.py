"""``simclr-path predict``: a segment run's class map of every tiled slide, as a mask and as QuPath GeoJSON.

For each slide of the stores, every stored patch is predicted (:func:`predict_patches`) and its
probabilities are pasted into a canvas at ``downsample`` level-0 pixels per output pixel (default:
the store's own resolution, its ``scale`` attribute). Where patches overlap (``tile --stride``
smaller than the patch) their probabilities are averaged. The class map is the argmax. Outputs:

* ``<slide>.png``: one 8-bit channel, ceil(width / downsample) x ceil(height / downsample) px
  (the slide's level-0 size), class index per pixel, 255 where no stored patch covers the pixel
  (background the tiler skipped). Output pixel (row i, column j) covers level-0 x in
  ``[j*d, (j+1)*d)`` and y likewise (d = downsample): the layout ``segment --labels`` reads, so a
  corrected prediction can be trained on again.
* ``<slide>.geojson``: a QuPath FeatureCollection with one annotation Polygon per connected
  region of each class except class 0 (background, not outlined), holes cut out. Vertices are the
  centres of the region's boundary pixels in level-0 px (``(column + 0.5) * d``), so an outline
  lies within half an output pixel of the true edge. Each feature carries its class name and
  colour and, when the slide's microns per pixel is known, ``area_um2`` (the polygon's area minus
  its holes). Regions without area as a polygon of pixel centres (one or two pixels, lines one
  pixel wide) are left out of the GeoJSON; they stay in the PNG.

Memory: patches are processed in row order and the canvas of probabilities is a band of rows a
little taller than one patch, so it does not grow with the slide; the full-size uint8 class map is
held once per slide (use ``--downsample`` for a smaller one). Both files are written atomically
(temporary file, then rename), so a folder never holds a half-written slide.

Files are named by slide key (:class:`~simclr_path.store.PatchStore`): two stores with a slide of
the same name give ``<slide>-<store file stem>`` for each, the names ``segment
--labels`` and ``select --annotated`` read back with the same stores.
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np

from simclr_path.annotations.geojson import annotation_feature, write_geojson
from simclr_path.errors import SimclrPathError, check_loader_options
from simclr_path.runtime.console import Reporter
from simclr_path.runtime.device import resolve_device
from simclr_path.runtime.images import resize_image
from simclr_path.segment.infer import predict_patches
from simclr_path.runtime.files import write_png
from simclr_path.segment.masks import FORMAT_KEY, IGNORE
from simclr_path.segment.model import check_store_resolution, load_segment_run
from simclr_path.store.reader import PatchStore, PatchSubset

UNCOVERED = IGNORE

#: (r, g, b) QuPath colours of classes 1, 2, ... (class 0 is background and not outlined); repeats past the end.
CLASS_COLOURS = [(220, 20, 60), (30, 144, 255), (50, 205, 50), (255, 165, 0), (148, 0, 211), (0, 206, 209),
                 (255, 20, 147), (139, 69, 19), (128, 128, 0), (70, 130, 180)]


#: Longest side of a predicted mask at the default downsample (uint8: 256 MiB at most per mask).
DEFAULT_MAX_SIDE = 16_384

def class_colour(value: int) -> tuple[int, int, int]:
    """The QuPath colour of class ``value`` (>= 1)."""
    return CLASS_COLOURS[(value - 1) % len(CLASS_COLOURS)]


def predict_slides(run: str, stores: list[str], out: str, *, downsample: float | None = None, device: str = "auto",
                   batch_size: int = 32, workers: int = 2, reporter: Reporter | None = None) -> dict:
    """Write ``<slide>.png`` and ``<slide>.geojson`` for every slide of ``stores`` into the folder ``out``.

    Args:
        run: segment run folder (or its checkpoint file).
        stores: tiled patch stores (not ingested folders: patches need slide coordinates).
        out: output folder (created if needed).
        downsample: level-0 px per output pixel, > 0; default each store's own (its ``scale``), coarser
            where that would make a mask longer than :data:`DEFAULT_MAX_SIDE` px (a 100,000 px wide
            slide at 0.5 um/px: 8,192 px wide at the default).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: patches per forward pass.
        workers: DataLoader processes reading patches.

    Returns:
        ``{"out", "slides": number of slides, "files": [paths written]}``.
    """
    if downsample is not None and not downsample > 0:
        raise SimclrPathError(f"--downsample must be a positive number of level-0 pixels per output pixel, "
                              f"got {downsample}")
    if not stores:
        raise SimclrPathError("no patch store given")
    check_loader_options(batch_size, workers)
    resolved = resolve_device(device)
    store = PatchStore(stores)
    plan = []
    for key, start, end in store.slide_ranges():  # files are named by slide key: unique over the stores
        _check_geometry(store, key)
        plan.append((key, start, end))
    model, meta = load_segment_run(run, resolved)
    check_store_resolution(store, meta, run)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise SimclrPathError(f"{out}: cannot create the output folder ({exc.strerror or exc}); choose another --out")\
            from None
    reporter = reporter or Reporter(enabled=False)
    files = []
    reporter.start(slides=len(plan))
    try:
        for stem, start, end in plan:
            reporter.add_patches(end - start)
            mask, d, mpp = predict_slide_mask(model, meta, store, stem, start, end, downsample=downsample,
                                              device=resolved, batch_size=batch_size, workers=workers,
                                              on_batch=reporter.patches_done)
            png = os.path.join(out, f"{stem}.png")
            write_png(png, mask, text={FORMAT_KEY: "index"})  # 255 = not tiled, whatever the classes
            geojson = os.path.join(out, f"{stem}.geojson")
            write_geojson(geojson, mask_features(mask, meta["classes"], d, mpp))
            files += [png, geojson]
            reporter.advance_slide()
    finally:
        reporter.stop()
    return {"out": out, "slides": len(plan), "files": files}


def _check_geometry(store: PatchStore, key: str) -> None:
    attrs = store.slide_group(key).attrs
    if "width" not in attrs or "scale" not in attrs:
        path, name = store.slide_source(key)
        raise SimclrPathError(f"{path}: slide {name} has no slide geometry (an ingested folder of images?); predict "
                              "needs a store made by 'simclr-path tile' (use segment-eval --images for plain images)")


def predict_slide_mask(model, meta: dict, store: PatchStore, name: str, start: int, end: int, *,
                       downsample: float | None, device, batch_size: int = 32, workers: int = 2,
                       on_batch=None, local: np.ndarray | None = None) -> tuple[np.ndarray, float, float | None]:
    """``(class map, downsample, level-0 um/px or None)`` of one slide: patches ``start..end`` of ``store``
    (slide key ``name``), or only those at positions ``local`` within the slide when given.

    The class map is uint8 (ceil(height / d), ceil(width / d)) with 255 where no predicted patch
    lies; see the module docstring for the pixel layout. Each output pixel is predicted once, from
    the mean probabilities of the patches covering it.
    """
    group = store.slide_group(name)
    attrs = group.attrs
    scale = float(attrs["scale"])  # level-0 px per stored px
    width, height = int(attrs["width"]), int(attrs["height"])
    # default: the store's own resolution, coarsened where needed to keep the class map (and the
    # per-class copies the contour step makes) within DEFAULT_MAX_SIDE px on the long side
    d = float(downsample) if downsample else max(scale, max(width, height) / DEFAULT_MAX_SIDE)
    mpp = float(attrs.get("level0_mpp", float("nan")))
    mpp = mpp if math.isfinite(mpp) and mpp > 0 else None
    coords = np.asarray(group["coords"][()], dtype=np.int64).reshape(-1, 2)
    positions = np.arange(end - start) if local is None else np.asarray(local, dtype=np.int64)
    coords = coords[positions]
    out_w, out_h = math.ceil(width / d), math.ceil(height / d)
    extent = store.patch_size * scale  # level-0 px covered by a patch
    # Each patch's box in output pixels (rounded to whole pixels: within half a pixel of exact).
    x0 = np.round(coords[:, 0] / d).astype(np.int64)
    y0 = np.round(coords[:, 1] / d).astype(np.int64)
    x1 = np.round((coords[:, 0] + extent) / d).astype(np.int64)
    y1 = np.round((coords[:, 1] + extent) / d).astype(np.int64)
    order = np.lexsort((x0, y0))  # row by row, so finished rows can be settled and dropped
    canvas = _BandCanvas(len(meta["classes"]), out_h, out_w, band=int((y1 - y0).max(initial=1)) + 1)
    subset = PatchSubset(store, (start + positions[order]).tolist())
    for positions, probs in predict_patches(model, meta, subset, device=device, batch_size=batch_size,
                                            workers=workers):
        for position, p in zip(positions, probs):
            i = order[position]
            canvas.add(p, int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i]))
        if on_batch is not None:
            on_batch(len(positions))
    return canvas.finish(), d, mpp


class _BandCanvas:
    """Sums of probabilities over a band of output rows; rows above every later patch are settled.

    Patches must come in increasing top row. Settled rows get the argmax class, or 255 where no
    patch contributed.
    """

    def __init__(self, num_classes: int, height: int, width: int, band: int):
        self.height, self.width = height, width
        self.rows = max(2 * band, 1)
        self.total = np.zeros((num_classes, self.rows, width), np.float32)
        self.count = np.zeros((self.rows, width), np.float32)
        self.top = 0  # output row held in band row 0
        self.mask = np.full((height, width), UNCOVERED, np.uint8)

    def add(self, probs: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> None:
        """Add patch probabilities (C, P, P) over output box [x0, x1) x [y0, y1)."""
        if y0 < self.top:
            raise ValueError("patches must come in increasing top row")
        if y1 - self.top > self.rows:
            self._settle(min(y0, self.height))
        if x1 <= x0 or y1 <= y0:
            return
        if (x1 - x0, y1 - y0) != probs.shape[1:][::-1]:
            probs = resize_image(np.ascontiguousarray(probs.transpose(1, 2, 0)), (x1 - x0, y1 - y0))
            probs = probs.reshape(y1 - y0, x1 - x0, -1).transpose(2, 0, 1)
        # clip to the slide
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, self.width), min(y1, self.height)
        if cx1 <= cx0 or cy1 <= cy0:
            return
        part = probs[:, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        self.total[:, cy0 - self.top:cy1 - self.top, cx0:cx1] += part
        self.count[cy0 - self.top:cy1 - self.top, cx0:cx1] += 1

    def _settle(self, upto: int) -> None:
        """Write rows [top, upto) into the mask and move the band down to start at ``upto``."""
        n = upto - self.top
        if n <= 0:
            return
        n_band = min(n, self.rows)
        covered = self.count[:n_band] > 0
        classes = self.total[:, :n_band].argmax(axis=0).astype(np.uint8)
        rows = slice(self.top, min(self.top + n_band, self.height))
        self.mask[rows] = np.where(covered, classes, UNCOVERED)[: rows.stop - rows.start]
        self.total[:, : self.rows - n_band] = self.total[:, n_band:].copy()
        self.total[:, self.rows - n_band:] = 0
        self.count[: self.rows - n_band] = self.count[n_band:].copy()
        self.count[self.rows - n_band:] = 0
        self.top = upto

    def finish(self) -> np.ndarray:
        while self.top < self.height:
            self._settle(min(self.top + self.rows, self.height))
        return self.mask


def mask_features(mask: np.ndarray, classes: list[str], downsample: float, mpp: float | None) -> list[dict]:
    """QuPath annotation features of every connected region of each class >= 1 of ``mask``.

    Coordinates are level-0 px: ``(pixel + 0.5) * downsample``. ``area_um2`` (polygon minus holes)
    is added when ``mpp`` (level-0 um/px) is known.
    """
    features = []
    for value in range(1, len(classes)):
        region = (mask == value).astype(np.uint8)
        if not region.any():
            continue
        contours, hierarchy = cv2.findContours(region, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        if hierarchy is None:
            continue
        hierarchy = hierarchy[0]  # per contour: next, previous, first child, parent
        for i, contour in enumerate(contours):
            if hierarchy[i][3] != -1 or len(contour) < 3:
                continue  # a hole (handled with its outer contour) or too small to be a polygon
            exterior = _level0(contour, downsample)
            if _area(exterior) == 0:
                continue  # a one-pixel-wide line: no area to outline
            holes = []
            child = hierarchy[i][2]
            while child != -1:
                hole = _level0(contours[child], downsample)
                if len(hole) >= 3 and _area(hole) > 0:
                    holes.append(hole)
                child = hierarchy[child][0]
            measurements = None
            if mpp is not None:
                area = _area(exterior) - sum(_area(h) for h in holes)
                measurements = {"area_um2": round(area * mpp * mpp, 3)}
            features.append(annotation_feature(exterior, classification=classes[value], color=class_colour(value),
                                               measurements=measurements, holes=holes))
    return features


def _level0(contour: np.ndarray, downsample: float) -> np.ndarray:
    return (contour.reshape(-1, 2).astype(np.float64) + 0.5) * downsample


def _area(ring: np.ndarray) -> float:
    return abs(float(cv2.contourArea(ring.astype(np.float32))))

