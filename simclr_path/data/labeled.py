"""Labelled patch sets for evaluation: class folders, a ``path,label[,split]`` CSV, or a labelled store.

A folder per class (ImageFolder convention), a CSV with ``path`` and ``label`` columns (optionally
``split`` with ``train``/``test`` values; other names such as PCam's ``valid`` count as train), or
a patch store ingested with labels.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simclr_path.errors import SimclrPathError
from simclr_path.store import PatchStore, PatchSubset
from simclr_path.store.ingest import IMAGE_EXTENSIONS


@dataclass
class Labeled:
    """Images (paths or a PatchStore with indices) with integer labels."""

    images: list
    labels: np.ndarray
    classes: list[str]
    splits: np.ndarray | None = None  # "train"/"test" per item, when the source says


def load_labeled(source: str) -> Labeled:
    """Read labelled patches from a class-folder tree, a CSV or an ingested store."""
    path = Path(source)
    if not path.exists():
        raise SimclrPathError(f"{source}: no such folder, CSV or store")
    if path.is_dir():
        classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        images, labels = [], []
        for index, name in enumerate(classes):
            files = sorted(p for p in (path / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            images += files
            labels += [index] * len(files)
        if len(classes) < 2 or not images:
            raise SimclrPathError(f"{source}: expected one subfolder of images per class (at least two classes)")
        return Labeled(images, np.array(labels), classes)
    if path.suffix.lower() == ".csv":
        return _load_csv(path)
    return _load_store(source)


def _load_csv(path: Path) -> Labeled:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "path" not in rows[0] or "label" not in rows[0]:
        raise SimclrPathError(f"{path}: a labelled CSV needs 'path' and 'label' columns")
    classes = sorted({r["label"] for r in rows})
    images = [path.parent / r["path"] for r in rows]
    missing = [str(p) for p in images if not p.exists()]
    if missing:
        raise SimclrPathError(f"{path}: {len(missing)} listed image(s) missing, e.g. {missing[0]}")
    splits = None
    if "split" in rows[0]:
        splits = np.array(["test" if r["split"] == "test" else "train" for r in rows])
    return Labeled(images, np.array([classes.index(r["label"]) for r in rows]), classes, splits)


def _load_store(source: str) -> Labeled:
    store = PatchStore(source)
    names = store.attrs[0].get("class_names")
    if names is None:
        raise SimclrPathError(f"{source}: the store has no labels; ingest a class-folder tree with 'simclr-path ingest'")
    labels = np.array([store.label(i) for i in range(len(store))])
    return Labeled(PatchSubset(store, range(len(store))), labels, [str(n) for n in names])


def subset(data: Labeled, indices) -> Labeled:
    indices = np.asarray(indices)
    images = data.images
    if isinstance(images, PatchSubset):
        picked = PatchSubset(images.store, [images.indices[i] for i in indices])
    else:
        picked = [images[i] for i in indices]
    return Labeled(picked, data.labels[indices], data.classes,
                   None if data.splits is None else data.splits[indices])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(round(test_fraction * len(idx))))
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return np.sort(train), np.sort(test)


def cap_per_class(labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    if cap is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))
