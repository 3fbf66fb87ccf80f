"""Segmentation labels for the patches of a store: per-slide masks or QuPath GeoJSON, one folder.

A labels folder holds, per labelled slide (named by its key in the stores: its name, or
``<name>-<store file stem>`` for a later store's slide of the same name, as ``select`` and
``predict`` name their files), either

* ``<slide>.png`` (any case, ``.PNG`` too): a mask at level 0 or at a downsample (level-0 px per
  mask px) inferred from its size against the slide's level-0 size (or given as
  ``mask_downsample``). What its values mean is the folder's mask format
  (:mod:`simclr_path.segment.masks`): class index per pixel with 255 = unlabelled (``index``), or
  0 = background and anything else the foreground class (``binary``: GlaS-style 0/255 masks,
  chosen by ``auto`` when the masks hold only 0 and 255); 1-bit, palette and grey+alpha PNGs are
  decoded as their authors meant; or
* ``<slide>.geojson``: QuPath annotations (polygons in level-0 px) whose classification names are
  the classes; pixels outside every annotation are unlabelled. Polygons are painted largest first,
  so a gland drawn inside a "background" region keeps its class. A square ``select`` proposed
  ("Annotate next") and exported back with annotations drawn in it counts as fully annotated:
  whatever no class polygon covers inside it is the first class (background), as in Lai et al.'s
  protocol where a proposed region is annotated whole. A proposed square with nothing drawn in it
  labels nothing (the pathologist has not looked at it yet); how many came back so is said on
  stderr.

Files naming no slide of the stores (a dataset's masks for images not tiled in this run, ``select``
thumbnails ``<slide>.thumbnail.png``) are skipped with a warning; a folder with no file for any
slide is an error. Every class (given with ``classes`` or inferred from mask values) must have
labelled pixels, and inferred classes are exactly the values seen: a class is never invented.

A patch's label is its level-0 box (``coords`` and the store's ``patch_size_level0``) cut from the
slide's labels and resampled (nearest neighbour) to the stored patch size. Only labelled pixels are
supervised; every other patch of the stores is unlabelled data for semi-supervised training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from simclr_path.annotations.geojson import ANNOTATE_NEXT, bounds, rasterize, read_geojson, square_of_each
from simclr_path.errors import SimclrPathError
from simclr_path.runtime.console import log as stderr_log
from simclr_path.segment.masks import (
    IGNORE, class_mask, decode_mask, is_mask_file, mask_downsample, resolve_mask_format,
)
from simclr_path.store import PatchStore

GEOJSON_SUFFIX = ".geojson"


@dataclass
class SlideLabels:
    """The labels of one slide: a class mask at ``downsample`` or a list of annotations."""

    name: str  # the slide's key in the stores
    source: str  # the label file
    mask: np.ndarray | None = None  # uint8 (H, W): class index, 255 unlabelled
    downsample: float = 1.0  # level-0 px per mask px
    annotations: list = field(default_factory=list)
    boxes: np.ndarray | None = None  # (A, 4) level-0 x0, y0, x1, y1 of each annotation

    def window(self, origin: tuple[int, int], extent: int, size: int, class_index: dict[str, int]) -> np.ndarray:
        """uint8 (size, size) labels of the level-0 square at ``origin`` with side ``extent``."""
        return self.region(origin, (extent, extent), (size, size), class_index)

    def region(self, origin: tuple[float, float], extent: tuple[float, float], size: tuple[int, int],
               class_index: dict[str, int]) -> np.ndarray:
        """uint8 (height, width) labels of the level-0 box at ``origin`` of (width, height) ``extent``,
        sampled at ``size`` = (width, height) pixels (nearest pixel centre); 255 where unlabelled."""
        if self.mask is not None:
            return _mask_region(self.mask, self.downsample, origin, extent, size)
        (x, y), (w, h) = origin, extent
        b = self.boxes
        overlapping = np.flatnonzero((b[:, 0] < x + w) & (b[:, 2] > x) & (b[:, 1] < y + h) & (b[:, 3] > y))
        if not len(overlapping):
            return np.full((size[1], size[0]), IGNORE, np.uint8)
        return rasterize([self.annotations[i] for i in overlapping], class_index, (float(x), float(y)), size,
                         downsample=w / size[0], fill=IGNORE, path=self.source)

    def overlaps(self, origin: tuple[int, int], extent: int) -> bool:
        """Whether the level-0 square could hold a labelled pixel (cheap test before :meth:`window`)."""
        if self.mask is not None:
            return True
        x, y = origin
        b = self.boxes
        return bool(((b[:, 0] < x + extent) & (b[:, 2] > x) & (b[:, 1] < y + extent) & (b[:, 3] > y)).any())


def _mask_region(mask: np.ndarray, downsample: float, origin, extent, size) -> np.ndarray:
    """Nearest-neighbour resample of a level-0 box of ``mask`` to ``size`` = (width, height); outside = 255."""
    (x0, y0), (w, h), (out_w, out_h) = origin, extent, size
    # centre of each output pixel, in mask pixels
    cols = np.floor((x0 + (np.arange(out_w) + 0.5) * (w / out_w)) / downsample).astype(np.int64)
    rows = np.floor((y0 + (np.arange(out_h) + 0.5) * (h / out_h)) / downsample).astype(np.int64)
    height, width = mask.shape
    out = np.full((out_h, out_w), IGNORE, np.uint8)
    col_ok = (cols >= 0) & (cols < width)
    row_ok = (rows >= 0) & (rows < height)
    if col_ok.any() and row_ok.any():
        out[np.ix_(row_ok, col_ok)] = mask[np.ix_(rows[row_ok], cols[col_ok])]
    return out


@dataclass
class LabelSet:
    """The labels of every labelled slide of a store, and the class names.

    Attributes:
        classes: class names, index = class value.
        slides: slide key -> its labels.
        mask_format: how mask values were read (``index`` or ``binary``; ``index`` without masks).
        unannotated_proposals: proposed squares that came back with nothing drawn in them (not labels).
    """

    classes: list[str]
    slides: dict[str, SlideLabels]
    mask_format: str = "index"
    unannotated_proposals: int = 0

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
                origin = (int(x), int(y))
                if labels.overlaps(origin, extent) and (labels.window(origin, extent, size, self.class_index)
                                                        != IGNORE).any():
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


def label_files(labels_dir: str) -> list[tuple[str, str, str]]:
    """``(slide key, path, kind)`` of every label file in ``labels_dir`` by its name, kind ``mask`` or
    ``geojson``: ``*.png``/``*.geojson`` in any case, ``select`` thumbnails and hidden files left out."""
    out = []
    for file in sorted(os.listdir(labels_dir)):
        path = os.path.join(labels_dir, file)
        if file.startswith(".") or not os.path.isfile(path):
            continue
        if is_mask_file(file):
            out.append((file[: -len(".png")], path, "mask"))
        elif file.lower().endswith(GEOJSON_SUFFIX):
            out.append((file[: -len(GEOJSON_SUFFIX)], path, "geojson"))
    return out


def load_labels(labels_dir: str, store: PatchStore, classes: list[str] | None = None,
                mask_downsample: float | None = None, mask_format: str = "auto",
                every_class_labelled: bool = True, log=stderr_log) -> LabelSet:
    """Every ``<slide>.png`` / ``<slide>.geojson`` in ``labels_dir``, checked against the store.

    Args:
        labels_dir: the labels folder.
        store: the stores the labels belong to; files are matched to slides by slide key. Files
            naming no slide are skipped with a warning; at least one must name a slide.
        classes: class names, index = class value. Required for GeoJSON; for masks, by default
            ``background`` plus ``class1``... for the values found, which must be 0..K with none missing.
        mask_downsample: level-0 px per mask px; by default inferred from each mask's size.
        mask_format: ``auto``, ``index`` or ``binary`` (see :mod:`simclr_path.segment.masks`).
        every_class_labelled: refuse a class without labelled pixels (training); ``segment-eval``'s
            truth need not show every class.
        log: called with each warning line (stderr by default).

    Example::

        labels = load_labels("labels/", PatchStore("slides.h5"), ["background", "gland"])
        labels.labelled_indices(store)          # patches with at least one labelled pixel
    """
    if not os.path.isdir(labels_dir):
        raise SimclrPathError(f"{labels_dir}: no such labels folder")
    files = label_files(labels_dir)
    if not files:
        raise SimclrPathError(f"{labels_dir}: no <slide>.png masks or <slide>.geojson annotations in the folder")
    keys = set(store.slide_names)
    matched = [(key, path, kind) for key, path, kind in files if key in keys]
    others = [path for key, path, kind in files if key not in keys]
    if not matched:
        raise SimclrPathError(
            f"{labels_dir}: none of its {len(files)} label file(s) names a slide of the stores (e.g. "
            f"{os.path.basename(files[0][1])}; slides: {_some(keys)}); name each file <slide>.png or "
            "<slide>.geojson after a slide of the stores"
        )
    if others:
        log(f"warning: {labels_dir}: skipped {len(others)} label file(s) naming no slide of the stores "
            f"({_some(os.path.basename(p) for p in others)})")
    seen: dict[str, str] = {}
    for key, path, _ in matched:
        if key in seen:
            raise SimclrPathError(f"{path}: slide {key!r} also has {os.path.basename(seen[key])}; keep one label "
                                  "file per slide (predict writes both: keep the .png mask, or the .geojson you "
                                  "corrected in QuPath)")
        seen[key] = path
    decoded = {path: decode_mask(path) for key, path, kind in matched if kind == "mask"}
    resolved, note = resolve_mask_format(mask_format, decoded)
    if note:
        log(f"{labels_dir}: {note}")
    slides: dict[str, SlideLabels] = {}
    unannotated = proposals = 0
    for key, path, kind in matched:
        if kind == "mask":
            slides[key] = _mask_labels(path, key, class_mask(decoded[path], resolved, mask_format != "auto"), store, mask_downsample)
        else:
            labels, empty, offered = _geojson_labels(path, key)
            unannotated, proposals = unannotated + empty, proposals + offered
            if labels is not None:
                slides[key] = labels
    if unannotated:
        log(f"{labels_dir}: {unannotated} of {proposals} proposed 'Annotate next' square(s) came back with nothing "
            "drawn in them: not labelled (annotate them in QuPath to use them)")
    if not slides:
        raise SimclrPathError(
            f"{labels_dir}: no labels: every proposed square came back unannotated ({unannotated}); draw and "
            "classify the regions inside the 'Annotate next' squares in QuPath, then export again"
        )
    classes = _resolve_classes(classes, slides, labels_dir, resolved, every_class_labelled)
    return LabelSet(classes=classes, slides=slides, mask_format=resolved if decoded else "index",
                    unannotated_proposals=unannotated)


def _some(names) -> str:
    listed = sorted(names)
    return ", ".join(listed[:3]) + (", ..." if len(listed) > 3 else "")


def _mask_labels(path: str, key: str, mask: np.ndarray, store: PatchStore, downsample: float | None) -> SlideLabels:
    attrs = store.slide_group(key).attrs
    width, height = attrs.get("width"), attrs.get("height")
    if width is None or height is None:
        patch_extent(store, key)  # raises the ingested-folder error
    downsample = mask_downsample(path, mask.shape, key, int(width), int(height), downsample)
    return SlideLabels(name=key, source=path, mask=mask, downsample=float(downsample))


def _geojson_labels(path: str, key: str) -> tuple[SlideLabels | None, int, int]:
    """``(labels or None, unannotated proposals, proposals)`` of a QuPath export.

    A proposed square counts (as annotated whole) only when a polygon was drawn in it
    (:func:`~simclr_path.annotations.geojson.square_of_each`: the square holding the drawing's
    centre, the nearest one where squares overlap). The others are dropped: nothing was drawn.
    """
    annotations = read_geojson(path)
    if not annotations:
        raise SimclrPathError(f"{path}: no polygon annotations; draw and classify regions in QuPath, then export")
    boxes = np.array([np.concatenate([np.min([bounds(p)[:2] for p in a.polygons], axis=0),
                                      np.max([bounds(p)[2:] for p in a.polygons], axis=0)])
                      for a in annotations], dtype=np.float64)
    is_proposal = np.array([a.classification == ANNOTATE_NEXT for a in annotations])
    drawn_polygons = np.array([bounds(p) for a in annotations if a.classification != ANNOTATE_NEXT
                               for p in a.polygons], dtype=np.float64).reshape(-1, 4)
    owner = square_of_each(drawn_polygons, boxes[is_proposal])
    keep = ~is_proposal
    keep[np.flatnonzero(is_proposal)[np.unique(owner[owner >= 0])]] = True
    proposals = int(is_proposal.sum())
    unannotated = int((is_proposal & ~keep).sum())
    if not keep.any():
        return None, unannotated, proposals
    kept = [a for a, k in zip(annotations, keep) if k]
    return SlideLabels(name=key, source=path, annotations=kept, boxes=boxes[keep]), unannotated, proposals


def _resolve_classes(classes: list[str] | None, slides: dict[str, SlideLabels], labels_dir: str,
                     mask_format: str, every_class_labelled: bool) -> list[str]:
    geojson = [s for s in slides.values() if s.mask is None]
    masks = [s for s in slides.values() if s.mask is not None]
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
    # labelled pixels per class value over the masks, annotations per class over the GeoJSON
    pixels = np.zeros(IGNORE + 1, dtype=np.int64)
    for s in masks:
        counts = np.bincount(s.mask.ravel(), minlength=IGNORE + 1)
        bad = np.flatnonzero(counts[:IGNORE]) if classes is None else \
            np.flatnonzero(counts[len(classes):IGNORE]) + len(classes)
        if classes is not None and len(bad):
            raise SimclrPathError(
                f"{s.source}: mask holds class value(s) {','.join(str(v) for v in bad[:5])} but "
                f"{'--classes names' if every_class_labelled else 'the run has'} {len(classes)} class(es) "
                f"(0..{len(classes) - 1}; 255 = unlabelled); fix the mask"
                + (" or add the classes" if every_class_labelled else "")
            )
        pixels += counts
    pixels = pixels[:IGNORE]
    annotated = {}
    for s in geojson:
        index = {c: i for i, c in enumerate(classes)}
        for a in s.annotations:
            if a.classification is None:
                raise SimclrPathError(
                    f"{s.source}: an annotation has no classification (an unclassified polygon"
                    + (f" named {a.name!r}" if a.name else "") + "); classify it in QuPath as one of "
                    f"{','.join(classes)} (or delete it) and export again"
                )
            if a.classification == ANNOTATE_NEXT:
                annotated[0] = annotated.get(0, 0) + 1
                continue
            if a.classification not in index:
                fix = ("add it to --classes or reclassify it in QuPath" if every_class_labelled else
                       "reclassify it in QuPath as one of the run's classes")
                raise SimclrPathError(
                    f"{s.source}: annotation class {a.classification!r} is not one of the classes "
                    f"{','.join(classes)}; {fix}"
                )
            annotated[index[a.classification]] = annotated.get(index[a.classification], 0) + 1
    if not pixels.any() and not annotated:
        raise SimclrPathError(f"{labels_dir}: the masks hold no labelled pixel (all 255); label some regions first")
    if classes is None:  # masks only: exactly the values seen, never a class nobody labelled
        values = np.flatnonzero(pixels)
        largest = int(values.max())
        missing = sorted(set(range(largest + 1)) - set(values.tolist()))
        if largest < 1:
            hint = ("; if your masks mark the foreground with 255, pass --mask-format binary"
                    if _index_masks_with_unlabelled(masks, mask_format) else "")
            raise SimclrPathError(
                f"{labels_dir}: the masks label only class 0 (background, {int(pixels[0])} px){hint}; label the "
                "other classes too, or name the classes with --classes")
        if missing:
            raise SimclrPathError(
                f"{labels_dir}: the masks hold class values {','.join(str(v) for v in values[:8])} but no pixel of "
                f"class {','.join(str(v) for v in missing[:8])}; renumber the classes 0..{len(values) - 1} or name "
                "them with --classes")
        classes = ["background"] + [f"class{i}" for i in range(1, largest + 1)]
    if every_class_labelled:
        for value, name in enumerate(classes):
            if pixels[value] == 0 and annotated.get(value, 0) == 0:
                what = f"{int(pixels[pixels > 0].sum())} labelled pixels in {len(masks)} mask(s)" if masks else ""
                if geojson:
                    what += (", " if what else "") + f"{sum(annotated.values())} annotation(s)"
                hint = ("; if 255 marks this class in your masks, pass --mask-format binary"
                        if masks and _index_masks_with_unlabelled(masks, mask_format) else "")
                raise SimclrPathError(
                    f"{labels_dir}: class {name!r} (value {value}) has no labelled pixels (0 of {what}); label some, "
                    f"or leave it out of --classes{hint}")
    return classes


def _index_masks_with_unlabelled(masks: list[SlideLabels], mask_format: str) -> bool:
    """Whether masks read as ``index`` hold unlabelled (255) pixels: a 0/255 binary mask read wrongly."""
    return mask_format == "index" and any((s.mask == IGNORE).any() for s in masks)
