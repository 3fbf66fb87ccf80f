"""``simclr-path segment-eval``: Dice and IoU of a segment run against held-out masks.

Two sources of truth:

* images mode (``images_dir`` + ``masks_dir``): plain images (png, jpg, jpeg, tif, tiff, bmp) and,
  for each, a mask ``<image stem>.png`` (any case) in the masks folder, of the image's size, read
  in the mask format (:mod:`simclr_path.segment.masks`: class index per pixel with 255 = not
  scored, or binary 0/255 masks, which ``auto`` recognises). An image without a mask, a mask of
  another size or with a value that is neither one of the run's class indices nor 255 stops the
  evaluation with a one-line error naming the file, before anything is predicted or written;
  masks without an image (a dataset's masks for images not in this run) are skipped with a
  warning. Each image is predicted whole (:func:`~simclr_path.segment.infer.predict_image`), at
  the model's input resolution when ``mpp`` (the images' um/px) and the run's input resolution are
  known, else as if at the training store's resolution.
* stores mode (``stores`` + ``labels_dir``): the labelled slides of tiled stores with labels in
  ``segment``'s format (see :mod:`simclr_path.segment.labels`). The patches holding a labelled
  pixel are predicted and pasted into one class map per slide as ``predict`` makes it (mean
  probabilities where patches overlap), so each slide pixel is scored once however much the
  patches overlap (``tile --overlap``); reported per slide.

Scores are pooled pixel counts (:class:`~simclr_path.segment.scores.ConfusionCounter`): ``overall``
over every scored pixel, one entry per image (or slide), and ``mean_per_image``, the mean over
images of each class's Dice and IoU (images where a class is absent from truth and prediction do
not count for that class). The headline ``mean_dice``/``mean_iou`` are over the foreground classes
(every class but class 0); background's scores are reported beside them. ``overlay_dir`` gets one PNG per image (per labelled patch in stores
mode) with the true outlines in green and the predicted ones in magenta.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from simclr_path.errors import SimclrPathError
from simclr_path.runtime.console import Reporter, log
from simclr_path.runtime.device import resolve_device
from simclr_path.segment.infer import predict_image
from simclr_path.segment.model import check_store_resolution, load_segment_run
from simclr_path.runtime.files import write_png
from simclr_path.segment.masks import IGNORE, class_mask, decode_mask, is_mask_file, resolve_mask_format
from simclr_path.segment.predict import predict_slide_mask
from simclr_path.segment.scores import ConfusionCounter, nan_mean
from simclr_path.store.ingest import read_image
from simclr_path.store.reader import PatchStore

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TRUTH_RGB = (0, 255, 0)
PREDICTION_RGB = (255, 0, 255)


def evaluate_segmentation(run: str, *, images_dir: str | None = None, masks_dir: str | None = None,
                          mpp: float | None = None, stores: list[str] | None = None, labels_dir: str | None = None,
                          device: str = "auto", overlay_dir: str | None = None, batch_size: int = 8,
                          workers: int = 2, reporter: Reporter | None = None, mask_format: str = "auto") -> dict:
    """Score the segment run ``run`` (folder or checkpoint) on images + masks or on labelled stores.

    Args:
        images_dir, masks_dir: images mode (both or neither); see the module docstring.
        mpp: microns per pixel of the images (images mode only).
        stores, labels_dir: stores mode (both or neither).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        overlay_dir: folder for ``<image stem>.png`` outline overlays (created if needed).
        batch_size: windows (images mode) or patches (stores mode) per forward pass.
        workers: DataLoader processes reading patches (stores mode).
        mask_format: what the truth masks' values mean (``auto``, ``index``, ``binary``).

    Returns:
        ``{"run", "mode", "classes", "images": [{"name", "dice", "iou", "mean_dice", "mean_iou",
        "pixels"}], "overall": {...same scores pooled...}, "mean_per_image": {"dice", "iou",
        "mean_dice", "mean_iou"}}``; in stores mode each ``images`` entry is a slide. Scores of a
        class absent from both truth and prediction are None.
    """
    images_mode = images_dir is not None or masks_dir is not None
    stores_mode = bool(stores) or labels_dir is not None
    if images_mode == stores_mode or (images_mode and not (images_dir and masks_dir)) or (
            stores_mode and not (stores and labels_dir)):
        raise SimclrPathError("give either --images DIR with --masks DIR, or STORES with --labels DIR")
    if images_mode and mpp is not None and not mpp > 0:
        raise SimclrPathError(f"--mpp must be a positive number of microns per pixel, got {mpp}")
    resolved = resolve_device(device)
    model, meta = load_segment_run(run, resolved)
    classes = list(meta["classes"])
    reporter = reporter or Reporter(enabled=False)
    if images_mode:
        pairs, resolved_format = pair_images(images_dir, masks_dir, len(classes), mask_format)
        _check_resolution(meta, mpp)
        entries, overall = _evaluate_images(model, meta, pairs, mpp, resolved, overlay_dir, batch_size, reporter,
                                            resolved_format, mask_format != "auto")
    else:
        entries, overall = _evaluate_stores(run, model, meta, list(stores), labels_dir, resolved, overlay_dir,
                                            batch_size, workers, reporter, mask_format)
    return {
        "run": str(run),
        "mode": "images" if images_mode else "stores",
        "classes": classes,
        "images": entries,
        "overall": overall.as_dict(classes),
        "mean_per_image": _mean_per_image(entries, classes),
    }


def pair_images(images_dir: str, masks_dir: str, num_classes: int,
                mask_format: str = "auto") -> tuple[list[tuple[str, Path, Path]], str]:
    """``((stem, image, mask) of every image sorted by stem, the resolved mask format)``, every pair checked.

    Raises :class:`SimclrPathError` (naming the file) for an image without a mask, two images with
    one stem, an unreadable file, a mask of another size than its image, or a mask value that is
    neither < ``num_classes`` nor 255. Masks without an image are skipped with a warning.
    """
    for folder, option in ((images_dir, "--images"), (masks_dir, "--masks")):
        if not os.path.isdir(folder):
            raise SimclrPathError(f"{folder}: no such folder ({option})")
    if os.path.samefile(images_dir, masks_dir):
        raise SimclrPathError(f"{masks_dir}: --masks is the --images folder; keep the masks in a folder of their own")
    images: dict[str, Path] = {}
    for path in sorted(Path(images_dir).iterdir()):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith("."):
            if path.stem in images:
                raise SimclrPathError(f"{path}: another image, {images[path.stem].name}, has the same name; "
                                      "keep one image per name")
            images[path.stem] = path
    if not images:
        raise SimclrPathError(f"{images_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    masks: dict[str, Path] = {}
    for p in sorted(Path(masks_dir).iterdir()):
        if is_mask_file(p.name) and p.is_file():
            if p.stem in masks:
                raise SimclrPathError(f"{p}: another mask, {masks[p.stem].name}, has the same name; keep one")
            masks[p.stem] = p
    for stem, path in images.items():
        if stem not in masks:
            raise SimclrPathError(f"{path}: no mask {stem}.png in {masks_dir}; add it or move the image out")
    extra = sorted(stem for stem in masks if stem not in images)
    if extra:
        shown = ", ".join(masks[stem].name for stem in extra[:3]) + (", ..." if len(extra) > 3 else "")
        log(f"warning: {masks_dir}: skipped {len(extra)} mask(s) without an image in {images_dir} ({shown})")
    pairs = [(stem, images[stem], masks[stem]) for stem in sorted(images)]
    decoded = {str(mask_path): decode_mask(str(mask_path)) for _, _, mask_path in pairs}
    resolved, note = resolve_mask_format(mask_format, decoded)
    if note:
        log(f"{masks_dir}: {note}")
    for _, image_path, mask_path in pairs:
        shape = read_image(image_path).shape[:2]
        _checked(class_mask(decoded[str(mask_path)], resolved, mask_format != "auto"), mask_path, num_classes, shape)
    return pairs, resolved


def read_mask(path: Path, num_classes: int, shape: tuple[int, int] | None = None,
              mask_format: str = "index", explicit: bool = False) -> np.ndarray:
    """uint8 (H, W) class mask at ``path`` read in ``mask_format`` (``index`` or ``binary``; the file's
    own declared format unless ``explicit``), checked: values < ``num_classes`` or 255, and (when
    given) ``shape`` = (H, W) of its image."""
    return _checked(class_mask(decode_mask(str(path)), mask_format, explicit), path, num_classes, shape)


def _checked(mask: np.ndarray, path, num_classes: int, shape: tuple[int, int] | None) -> np.ndarray:
    if shape is not None and mask.shape != tuple(shape):
        raise SimclrPathError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image is "
                              f"{shape[1]}x{shape[0]}; save the mask at the image's size")
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE)]
    if len(bad):
        raise SimclrPathError(f"{path}: mask value(s) {','.join(str(v) for v in bad[:5])} are not class indices "
                              f"0..{num_classes - 1} of the run nor 255 (not scored); fix the mask")
    return mask


def _check_resolution(meta: dict, mpp: float | None) -> None:
    """Say on stderr what resolution the images are taken to have when it cannot be matched."""
    patch_mpp = meta.get("patch_mpp")
    at = f" ({patch_mpp:g} um/px)" if patch_mpp else ""
    if mpp is None and meta.get("input_mpp"):
        log(f"--mpp not given: the images are assumed to be at the training patches' resolution{at}; pass --mpp "
            "if they are not")
    elif mpp is not None and not meta.get("input_mpp"):
        log(f"--mpp {mpp:g} ignored: the run does not know the microns per pixel it was trained at; the images "
            "are assumed to be at the training patches' resolution")


def _evaluate_images(model, meta, pairs, mpp, device, overlay_dir, batch_size, reporter, mask_format, explicit):
    classes = meta["classes"]
    overall = ConfusionCounter(len(classes))
    entries = []
    if overlay_dir:
        _make_folder(overlay_dir)
    reporter.start(slides=len(pairs))
    try:
        for stem, image_path, mask_path in pairs:
            rgb = read_image(image_path)
            truth = read_mask(mask_path, len(classes), rgb.shape[:2], mask_format, explicit)
            probs = predict_image(model, meta, rgb, mpp, device=device, batch_size=batch_size)
            pred = probs.argmax(axis=0).astype(np.uint8)
            counter = ConfusionCounter(len(classes))
            counter.update(pred, truth)
            overall.merge(counter)
            entries.append({"name": stem, **counter.as_dict(classes)})
            if overlay_dir:
                write_png(os.path.join(overlay_dir, f"{stem}.png"), overlay(rgb, truth, pred))
            reporter.advance_slide()
    finally:
        reporter.stop()
    return entries, overall


def _evaluate_stores(run, model, meta, stores, labels_dir, device, overlay_dir, batch_size, workers, reporter,
                     mask_format):
    from simclr_path.segment.labels import load_labels, patch_extent

    classes = meta["classes"]
    store = PatchStore(stores)
    check_store_resolution(store, meta, run)
    labels = load_labels(labels_dir, store, classes, mask_format=mask_format, every_class_labelled=False)
    indices = labels.labelled_indices(store)
    if not len(indices):
        raise SimclrPathError(f"{labels_dir}: no patch of the stores has a labelled pixel; check that the labels "
                              "cover tissue that was tiled")
    if overlay_dir:
        _make_folder(overlay_dir)
    entries = []
    overall = ConfusionCounter(len(classes))
    slides = [(key, start, end, indices[(indices >= start) & (indices < end)])
              for key, start, end in store.slide_ranges()]
    slides = [slide for slide in slides if len(slide[3])]
    reporter.start(slides=len(slides))
    try:
        for key, start, end, chosen in slides:
            reporter.add_patches(len(chosen))
            pred, d, _ = predict_slide_mask(model, meta, store, key, start, end, downsample=None, device=device,
                                            batch_size=batch_size, workers=workers, on_batch=reporter.patches_done,
                                            local=chosen - start)
            height, width = pred.shape
            truth = labels.slides[key].region((0.0, 0.0), (width * d, height * d), (width, height),
                                              labels.class_index)
            uncovered = pred == IGNORE  # no labelled patch there: not scored
            truth[uncovered] = IGNORE
            pred[uncovered] = 0
            counter = ConfusionCounter(len(classes))
            counter.update(pred, truth)
            overall.merge(counter)
            entries.append({"name": key, **counter.as_dict(classes)})
            if overlay_dir:
                _patch_overlays(overlay_dir, store, labels, key, chosen, pred, d,
                                patch_extent(store, key))
            reporter.advance_slide()
    finally:
        reporter.stop()
    return entries, overall


def _patch_overlays(folder, store, labels, key, chosen, pred, d, extent) -> None:
    """``<slide>_<x>_<y>.png`` of each labelled patch: its truth and the slide map's prediction there."""
    size = store.patch_size
    for index in chosen:
        _, x, y = store.coords(int(index))
        centres = (np.arange(size) + 0.5) * (extent / size)
        cols = np.clip(np.floor((x + centres) / d).astype(np.int64), 0, pred.shape[1] - 1)
        rows = np.clip(np.floor((y + centres) / d).astype(np.int64), 0, pred.shape[0] - 1)
        write_png(os.path.join(folder, f"{key}_{x}_{y}.png"),
                  overlay(store[int(index)], labels.patch_mask(store, int(index)), pred[np.ix_(rows, cols)]))


def _mean_per_image(entries: list[dict], classes: list[str]) -> dict:
    out = {}
    for score in ("dice", "iou"):
        out[score] = {name: nan_mean([e[score][name] for e in entries]) for name in classes}
        out[f"mean_{score}"] = nan_mean([e[f"mean_{score}"] for e in entries])  # foreground classes
        out[f"background_{score}"] = nan_mean([e[f"background_{score}"] for e in entries])
    return out


def overlay(rgb: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``rgb`` with the outlines of every non-background class region: truth green, prediction magenta.

    Class 0 is background and is not outlined; unscored truth pixels (255) are not outlined either.
    The prediction's line is about 1/300 of the image side thick (at least 1 px) and is drawn over a
    truth line three times as thick, so where they agree a magenta line runs inside a green one.
    """
    out = np.ascontiguousarray(rgb.copy())
    thin = max(1, int(round(min(rgb.shape[:2]) / 300)))
    for mask, colour, thickness in ((truth, TRUTH_RGB, 3 * thin), (pred, PREDICTION_RGB, thin)):
        for value in np.unique(mask):
            if value == 0 or value == IGNORE:
                continue
            contours, _ = cv2.findContours((mask == value).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def _make_folder(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise SimclrPathError(f"{folder}: cannot create the folder ({exc.strerror or exc}); choose another --overlay")\
            from None
