"""Segmentation labels for the patches of a store: per-slide masks or QuPath GeoJSON, one folder.

A labels folder holds, per labelled slide (named as in the store), either

* ``<slide>.png``: a one-channel mask, class index per pixel, 255 = unlabelled (not supervised),
  at level 0 or at a downsample (level-0 px per mask px) inferred from its size against the slide's
  level-0 size (or given as ``mask_downsample``); or
* ``<slide>.geojson``: QuPath annotations (polygons in level-0 px) whose classification names are
  the classes; pixels outside every annotation are unlabelled. Polygons are painted largest first,
  so a gland drawn inside a "background" region keeps its class. A square ``select`` proposed
  ("Annotate next") and exported back with the annotations drawn in it counts as fully annotated:
  whatever no class polygon covers inside it is the first class (background), as in Lai et al.'s
  protocol where a proposed region is annotated whole.

A patch's label is its level-0 box (``coords`` and the store's ``patch_size_level0``) cut from the
slide's labels and resampled (nearest neighbour) to the stored patch size. Only labelled pixels are
supervised; every other patch of the stores is unlabelled data for semi-supervised training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from simclr_path.annotations.geojson import ANNOTATE_NEXT, rasterize, read_geojson
from simclr_path.errors import SimclrPathError
from simclr_path.segment.masks import IGNORE, mask_downsample, read_class_mask
from simclr_path.store import PatchStore

MASK_SUFFIX = ".png"
GEOJSON_SUFFIX = ".geojson"


@dataclass
class SlideLabels:
    """The labels of one slide: a mask at ``downsample`` or a list of annotations."""

    name: str
    source: str  # the label file
    mask: np.ndarray | None = None  # uint8 (H, W): class index, 255 unlabelled
    downsample: float = 1.0  # level-0 px per mask px
    annotations: list = field(default_factory=list)
    boxes: np.ndarray | None = None  # (A, 4) level-0 x0, y0, x1, y1 of each annotation

    def window(self, origin: tuple[int, int], extent: int, size: int, class_index: dict[str, int]) -> np.ndarray:
        """uint8 (size, size) labels of the level-0 square at ``origin`` with side ``extent``."""
        if self.mask is not None:
            return _mask_window(self.mask, self.downsample, origin, extent, size)
        x, y = origin
        b = self.boxes
        overlapping = np.flatnonzero((b[:, 0] < x + extent) & (b[:, 2] > x) & (b[:, 1] < y + extent) & (b[:, 3] > y))
        hits = [self.annotations[i] for i in overlapping]
        if not hits:
            return np.full((size, size), IGNORE, np.uint8)
        return rasterize(hits, class_index, (float(x), float(y)), (size, size), downsample=extent / size,
                         fill=IGNORE, path=self.source)


def _mask_window(mask: np.ndarray, downsample: float, origin, extent: int, size: int) -> np.ndarray:
    """Nearest-neighbour resample of a level-0 box of ``mask`` to size x size; outside the mask = 255."""
    x0, y0 = origin
    # centre of each output pixel, in mask pixels
    centres = (np.arange(size) + 0.5) * (extent / size)
    cols = np.floor((x0 + centres) / downsample).astype(np.int64)
    rows = np.floor((y0 + centres) / downsample).astype(np.int64)
    h, w = mask.shape
    out = np.full((size, size), IGNORE, np.uint8)
    col_ok = (cols >= 0) & (cols < w)
    row_ok = (rows >= 0) & (rows < h)
    if col_ok.any() and row_ok.any():
        out[np.ix_(row_ok, col_ok)] = mask[np.ix_(rows[row_ok], cols[col_ok])]
    return out


@dataclass
class LabelSet:
    """The labels of every labelled slide of a store, and the class names."""

    classes: list[str]
    slides: dict[str, SlideLabels]

    @property
    def class_index(self) -> dict[str, int]:
        """Class value of each annotation class; a proposed "Annotate next" square is the first class."""
        index = {ANNOTATE_NEXT: 0}
        index.update((name, i) for i, name in enumerate(self.classes))
        return index

    def patch_mask(self, store: PatchStore, index: int) -> np.ndarray:
        """uint8 (P, P) class index per pixel of store patch ``index``; 255 where unlabelled."""
        slide, x, y = store.coords(index)
        size = store.patch_size
        labels = self.slides.get(slide)
        if labels is None:
            return np.full((size, size), IGNORE, np.uint8)
        return labels.window((x, y), patch_extent(store, slide), size, self.class_index)

    def labelled_indices(self, store: PatchStore) -> np.ndarray:
        """Indices of the store's patches with at least one labelled pixel."""
        found = []
        for slide, start, end in store.slide_ranges():
            labels = self.slides.get(slide)
            if labels is None:
                continue
            coords = store.slide_group(slide)["coords"][()]
            extent = patch_extent(store, slide)
            size = store.patch_size
            for local, (x, y) in enumerate(coords):
                if labels.mask is None:
                    b = labels.boxes
                    if not ((b[:, 0] < x + extent) & (b[:, 2] > x) & (b[:, 1] < y + extent) & (b[:, 3] > y)).any():
                        continue
                if (labels.window((int(x), int(y)), extent, size, self.class_index) != IGNORE).any():
                    found.append(start + local)
        return np.asarray(found, dtype=np.int64)


def patch_extent(store: PatchStore, slide: str) -> int:
    """Side of slide ``slide``'s patches in level-0 px."""
    group = store.slide_group(slide)
    extent = group["coords"].attrs.get("patch_size_level0")
    if extent is None:  # an ingested folder: patches are whole images, no level-0 geometry
        raise SimclrPathError(
            f"{slide}: the store's patches have no slide geometry (an ingested folder?); tile the images with "
            "'simclr-path tile ... --slide-mpp MPP --min-tissue 0' to segment them"
        )
    return int(extent)


def load_labels(labels_dir: str, store: PatchStore, classes: list[str] | None = None,
                mask_downsample: float | None = None) -> LabelSet:
    """Every ``<slide>.png`` / ``<slide>.geojson`` in ``labels_dir``, checked against the store.

    Args:
        labels_dir: the labels folder.
        store: the stores the labels belong to; every label file must name one of its slides.
        classes: class names, index = class value. Required for GeoJSON; for masks, by default
            ``background`` plus ``class1``... up to the largest value found.
        mask_downsample: level-0 px per mask px; by default inferred from each mask's size.
    """
    if not os.path.isdir(labels_dir):
        raise SimclrPathError(f"{labels_dir}: no such labels folder")
    files = sorted(f for f in os.listdir(labels_dir) if f.endswith((MASK_SUFFIX, GEOJSON_SUFFIX)))
    if not files:
        raise SimclrPathError(f"{labels_dir}: no <slide>.png masks or <slide>.geojson annotations in the folder")
    names = set(store.slide_names)
    slides: dict[str, SlideLabels] = {}
    for file in files:
        path = os.path.join(labels_dir, file)
        name = file[: -len(MASK_SUFFIX)] if file.endswith(MASK_SUFFIX) else file[: -len(GEOJSON_SUFFIX)]
        if name not in names:
            raise SimclrPathError(
                f"{path}: names slide {name!r}, which is not in the stores ({_some(names)}); rename the file or "
                "pass the store that holds that slide"
            )
        if name in slides:
            raise SimclrPathError(f"{path}: slide {name!r} has both a mask and a GeoJSON; keep one")
        if file.endswith(MASK_SUFFIX):
            slides[name] = _read_mask(path, name, store, mask_downsample)
        else:
            slides[name] = _read_geojson(path, name)
    classes = _resolve_classes(classes, slides, labels_dir)
    return LabelSet(classes=classes, slides=slides)


def _some(names) -> str:
    listed = sorted(names)
    return ", ".join(listed[:3]) + (", ..." if len(listed) > 3 else "")


def _read_mask(path: str, name: str, store: PatchStore, downsample: float | None) -> SlideLabels:
    mask = read_class_mask(path)
    attrs = store.slide_group(name).attrs
    width, height = attrs.get("width"), attrs.get("height")
    if width is None or height is None:
        patch_extent(store, name)  # raises the ingested-folder error
    downsample = mask_downsample(path, mask.shape, name, int(width), int(height), downsample)
    return SlideLabels(name=name, source=path, mask=mask, downsample=float(downsample))


def _read_geojson(path: str, name: str) -> SlideLabels:
    annotations = read_geojson(path)
    if not annotations:
        raise SimclrPathError(f"{path}: no polygon annotations; draw and classify regions in QuPath, then export")
    boxes = []
    for a in annotations:
        points = np.concatenate([poly[0] for poly in a.polygons])
        boxes.append([points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max()])
    return SlideLabels(name=name, source=path, annotations=annotations, boxes=np.asarray(boxes, dtype=np.float64))


def _resolve_classes(classes: list[str] | None, slides: dict[str, SlideLabels], labels_dir: str) -> list[str]:
    geojson = [s for s in slides.values() if s.mask is None]
    if classes is not None:
        classes = [c.strip() for c in classes if c.strip()]
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise SimclrPathError(f"--classes needs two or more distinct names, got {','.join(classes)!r}")
        if len(classes) > IGNORE:
            raise SimclrPathError(f"--classes: at most {IGNORE} classes (255 marks unlabelled pixels)")
    elif geojson:
        found = sorted({a.classification for s in geojson for a in s.annotations
                        if a.classification and a.classification != ANNOTATE_NEXT})
        raise SimclrPathError(
            f"{geojson[0].source}: GeoJSON labels need the class list; pass --classes (found: {','.join(found) or 'none'}), "
            "the first class is class 0"
        )
    labelled = 0
    largest = 0
    for s in slides.values():
        if s.mask is None:
            index = {c: i for i, c in enumerate(classes)}
            for a in s.annotations:
                if a.classification is None:
                    raise SimclrPathError(
                        f"{s.source}: an annotation has no classification (an unclassified polygon"
                        + (f" named {a.name!r}" if a.name else "") + "); classify it in QuPath as one of "
                        f"{','.join(classes)} (or delete it) and export again"
                    )
                if a.classification not in index and a.classification != ANNOTATE_NEXT:
                    raise SimclrPathError(
                        f"{s.source}: annotation class {a.classification!r} is not one of --classes "
                        f"{','.join(classes)}; add it to --classes or reclassify it in QuPath"
                    )
            labelled += len(s.annotations)
            continue
        values = np.unique(s.mask)
        values = values[values != IGNORE]
        labelled += len(values)
        if len(values):
            largest = max(largest, int(values.max()))
        if classes is not None and len(values) and values.max() >= len(classes):
            raise SimclrPathError(
                f"{s.source}: mask holds class value(s) {','.join(str(v) for v in values if v >= len(classes))} but "
                f"--classes names {len(classes)} class(es) (0..{len(classes) - 1}; 255 = unlabelled); fix the mask "
                "or add the classes"
            )
    if not labelled:
        raise SimclrPathError(f"{labels_dir}: the masks hold no labelled pixel (all 255); label some regions first")
    if classes is None:
        classes = ["background"] + [f"class{i}" for i in range(1, max(largest, 1) + 1)]
    return classes
