"""``simclr-path ingest``: a folder of patch images (PCam, Kather CRC, a lab's own exports) into a
patch store, so ``pretrain``, ``embed`` and ``eval`` take it like a tiled one.

Images are found recursively (png, jpg, jpeg, tif, tiff). Each top-level subfolder becomes one
group of the store (``/slides/<folder>``); when the folder names are classes (ImageFolder
convention), each group also holds ``labels`` (int64 index into the root attribute
``class_names``). Images already JPEG at the stored size keep their original bytes; the rest are
decoded, resized with area interpolation (``--size``) and re-encoded. Coordinates have no meaning
here and are -1; ``source_files`` holds each patch's path relative to the folder.

With a QC measure (``--qc on``, the default of the command), every image is measured on its pixels
at the stored size and each group is flagged as ``tile`` flags a slide (blur and folds against the
group's own distribution), stored in the same datasets and attributes (:mod:`simclr_path.store.qc`),
so ``--exclude-qc`` and ``info`` read an ingested store as a tiled one. The measure is passed in
(``simclr_path.wsi.qc.PatchQC``): the store stage never imports the slide stage.

Example (``PatchQC`` is ``simclr_path.wsi.qc.PatchQC``)::

    ingest_folder("pcam/valid", "pcam-valid.h5", mpp=0.97, qc=PatchQC())["qc"]["total"]
    # {"pen": 9, "blur": 30, "fold": 0, "clean": 2964, "excluded": 36}
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import cv2
import h5py
import numpy as np

from simclr_path.errors import SimclrPathError
from simclr_path.runtime.images import resize_image
from simclr_path.store.codecs import create_pixel_dataset, encode_jpeg, write_patches
from simclr_path.store.format import QC_KEY
from simclr_path.store.qc import QCMeasure, qc_summary, write_qc
from simclr_path.store.writer import StoreWriter

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def find_images(folder: str) -> dict[str, list[Path]]:
    """Images under each top-level subfolder of ``folder`` (or under ``folder`` itself)."""
    root = Path(folder)
    if not root.is_dir():
        raise SimclrPathError(f"{folder}: no such folder")
    groups: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith("."):
            relative = path.relative_to(root)
            group = relative.parts[0] if len(relative.parts) > 1 else root.name
            groups.setdefault(group, []).append(path)
    if not groups:
        raise SimclrPathError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return groups


def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of the image file at ``path``; an unreadable, missing or empty file
    is a one-line :class:`SimclrPathError` naming it."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None  # imdecode raises on 0 bytes
    except (OSError, cv2.error):
        bgr = None
    if bgr is None:
        empty = " (the file is empty, 0 bytes)" if os.path.isfile(path) and os.path.getsize(path) == 0 else ""
        raise SimclrPathError(f"{path}: not a readable image{empty}; remove or re-export it")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _is_jpeg(path: Path) -> bool:
    return path.suffix.lower() in (".jpg", ".jpeg")


def ingest_folder(folder: str, out: str, size: int | None = None, labels: bool = True, mpp: float | None = None,
                  jpeg_quality: int = 90, qc: QCMeasure | None = None) -> dict:
    """Write every image under ``folder`` into the store ``out``; returns a summary.

    Args:
        size: side of the stored patches; images of another size are resized (default: the
            first image's size, and every image must then be square and that size).
        labels: keep the top-level folder names as class labels.
        mpp: microns per pixel of the images, if known (recorded; PCam is about 0.97).
        qc: measures and flags QC per group (``simclr_path.wsi.qc.PatchQC()``); None: no QC
            datasets, root attribute ``qc`` = ``"off"``. The summary's ``qc`` holds the patches per
            reason, in total and per group (``"slides"``, as ``tile`` prints it), or None.
    """
    groups = find_images(folder)
    first = read_image(next(iter(groups.values()))[0])
    if size is None:
        if first.shape[0] != first.shape[1]:
            raise SimclrPathError(f"{folder}: images are not square ({first.shape[1]}x{first.shape[0]}); pass --size")
        size = first.shape[0]
    if not 8 <= size <= 4096:
        raise SimclrPathError(f"--size must be between 8 and 4096 pixels, got {size}")
    if mpp is not None and not mpp > 0:
        raise SimclrPathError(f"--mpp must be > 0, got {mpp}")
    attrs = _spec_attrs(size, mpp, jpeg_quality)
    attrs[QC_KEY] = "off" if qc is None else "on"
    class_names = sorted(groups) if labels else []
    if os.path.exists(out):
        raise SimclrPathError(f"{out}: already exists; ingest into a new --out")
    writer = StoreWriter(out, attrs)
    total, counts, complete = 0, {}, False
    try:
        if class_names:
            writer.file.attrs["class_names"] = np.array(class_names, dtype=h5py.string_dtype())
        for name in sorted(groups):
            paths = groups[name]
            group = writer.begin(name)
            group.attrs.update({"source_path": os.path.abspath(os.path.join(folder, name)), "fingerprint": f"ingest:{name}",
                                "mpp_source": "cli" if mpp else "none", "level0_mpp": mpp or float("nan"),
                                "num_patches": len(paths)})
            group.create_dataset("coords", data=np.full((len(paths), 2), -1, dtype=np.int64))
            group.create_dataset("tissue_fraction", data=np.ones(len(paths), dtype=np.float32))
            group.create_dataset("source_files", data=np.array([str(p.relative_to(folder)) for p in paths],
                                                               dtype=h5py.string_dtype()))
            if class_names:
                group.create_dataset("labels", data=np.full(len(paths), class_names.index(name), dtype=np.int64))
            dataset = create_pixel_dataset(group, "jpeg", len(paths), size)
            scores = None if qc is None else np.zeros((len(paths), len(qc.score_names)), np.float32)
            for index, path in enumerate(paths):
                encoded, pixels = _encoded(path, size, jpeg_quality)
                write_patches(dataset, index, [encoded], "jpeg")
                if qc is not None:
                    scores[index] = qc.scores(pixels)
            if qc is not None:
                flags, stats = qc.flags(scores)
                counts[name] = write_qc(group, scores, flags, qc.score_names, qc.params, stats)
            writer.commit(name)
            total += len(paths)
        complete = True
    except OSError as exc:
        raise SimclrPathError(f"{out}: write failed ({exc.strerror or exc}); rerun once there is room") from None
    finally:
        writer.close()
        if not complete:  # a bad image, a full disk, Ctrl-C: no half-written store where a whole one is expected
            with contextlib.suppress(OSError):
                os.remove(out)
    return {"store": os.path.abspath(out), "patches": total, "groups": len(groups), "patch_size": size,
            "classes": class_names, "qc": None if qc is None else qc_summary(counts)}


def _encoded(path: Path, size: int, quality: int) -> tuple[np.ndarray, np.ndarray]:
    """The JPEG bytes to store for the image at ``path``, and its RGB pixels at the stored size
    (before encoding, as ``tile`` measures QC on them)."""
    image = read_image(path)
    if image.shape[:2] == (size, size) and _is_jpeg(path):
        return np.fromfile(str(path), dtype=np.uint8), image  # already what we would store: keep its bytes
    image = resize_image(image, size)
    return encode_jpeg(image, quality), image


def _spec_attrs(size: int, mpp: float | None, quality: int) -> dict:
    nan = float("nan")
    return {"target_mpp": mpp or nan, "magnification": nan, "patch_size": size, "stride": nan, "min_tissue": 0.0,
            "codec": "jpeg", "jpeg_quality": quality}
