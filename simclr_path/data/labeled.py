"""Labelled patch sets for evaluation: class folders, a ``path,label[,split][,group]`` CSV, or a labelled store.

A folder per class (ImageFolder convention), a CSV with ``path`` and ``label`` columns (optionally
``split`` with ``train``/``test`` values; other names such as PCam's ``valid`` count as train), or
a patch store ingested with labels.

Groups (patient, case, slide) keep patches of one patient on one side of every split, since
patches of a patient in both train and test inflate accuracy. They come from a CSV ``group``
column, or from the file names with a regular expression (``group_regex``: class folders, a CSV
without ``group``, or a store ingested from files). :func:`group_split` splits by them.
"""

from __future__ import annotations

import csv
import re
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
    groups: np.ndarray | None = None  # patient/case/slide per item (str), when the source says


def load_labeled(source: str, group_regex: str | None = None) -> Labeled:
    """Read labelled patches from a class-folder tree, a CSV or an ingested store.

    ``group_regex`` reads each item's group from its file name (see :func:`group_from_name`).
    """
    path = Path(source)
    if not path.exists():
        raise SimclrPathError(f"{source}: no such folder, CSV or store")
    pattern = _compile_group_regex(group_regex)
    if path.is_dir():
        return _load_folders(path, pattern)
    if path.suffix.lower() == ".csv":
        return _load_csv(path, pattern)
    return _load_store(source, pattern)


def _load_folders(path: Path, pattern: re.Pattern | None) -> Labeled:
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (path / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        images += files
        labels += [index] * len(files)
    if len(classes) < 2 or not images:
        raise SimclrPathError(f"{path}: expected one subfolder of images per class (at least two classes)")
    groups = None if pattern is None else _groups_from_names(pattern, images)
    return Labeled(images, np.array(labels), classes, groups=groups)


def _load_csv(path: Path, pattern: re.Pattern | None = None) -> Labeled:
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
    groups = None
    if "group" in rows[0]:
        if pattern is not None:
            raise SimclrPathError(f"{path}: has a 'group' column and --group-regex was given; give one of the two")
        groups = _csv_groups(path, rows)
    elif pattern is not None:
        groups = _groups_from_names(pattern, images)
    return Labeled(images, np.array([classes.index(r["label"]) for r in rows]), classes, splits, groups)


def _csv_groups(path: Path, rows: list[dict]) -> np.ndarray:
    """The ``group`` column (stripped); an empty cell is an error, since it would be a group of its own."""
    groups = [(r["group"] or "").strip() for r in rows]
    if "" in groups:
        line = groups.index("") + 2  # the header is line 1
        raise SimclrPathError(f"{path}: line {line} has an empty 'group'; give every row its patient/case/slide")
    return np.array(groups)


def _load_store(source: str, pattern: re.Pattern | None = None) -> Labeled:
    store = PatchStore(source)
    names = store.attrs[0].get("class_names")
    if names is None:
        raise SimclrPathError(f"{source}: the store has no labels; ingest a class-folder tree with 'simclr-path ingest'")
    labels = np.array([store.label(i) for i in range(len(store))])
    if len(names) < 2 or len(np.unique(labels)) < 2:
        raise SimclrPathError(f"{source}: the store's patches hold {len(np.unique(labels))} class(es); evaluation "
                              "needs labelled patches of at least two classes (ingest one subfolder per class)")
    groups = None if pattern is None else _groups_from_names(pattern, _store_file_names(store, source))
    return Labeled(PatchSubset(store, range(len(store))), labels, [str(n) for n in names], groups=groups)


def _store_file_names(store: PatchStore, source: str) -> list[str]:
    """The image file each patch of an ingested store came from (``source_files``), in patch order."""
    names = []
    for slide, _, _ in store.slide_ranges():
        group = store.slide_group(slide)
        if "source_files" not in group:
            raise SimclrPathError(f"{source}: the store has no file names for --group-regex; "
                                  "give the class folders or a CSV with a 'group' column instead")
        names += [n.decode() if isinstance(n, bytes) else str(n) for n in group["source_files"][()]]
    return names


def _compile_group_regex(group_regex: str | None) -> re.Pattern | None:
    if group_regex is None:
        return None
    try:
        return re.compile(group_regex)
    except re.error as exc:
        raise SimclrPathError(f"--group-regex '{group_regex}' is not a valid regular expression ({exc})") from None


def group_from_name(pattern: re.Pattern, file) -> str:
    """The group of ``file``: ``pattern`` searched in its name (not its folders); the first capture
    group if the pattern has one, else the whole match."""
    name = Path(file).name
    match = pattern.search(name)
    group = None if match is None else (match.group(1) if pattern.groups else match.group(0))
    if not group:
        raise SimclrPathError(f"{file}: --group-regex '{pattern.pattern}' does not match the file name {name!r}; "
                              "change the regex so it matches every file name, or remove the file")
    return group


def _groups_from_names(pattern: re.Pattern, files) -> np.ndarray:
    return np.array([group_from_name(pattern, f) for f in files])


def subset(data: Labeled, indices) -> Labeled:
    indices = np.asarray(indices, dtype=np.int64)
    images = data.images
    if isinstance(images, PatchSubset):
        picked = PatchSubset(images.store, [images.indices[i] for i in indices])
    else:
        picked = [images[i] for i in indices]
    return Labeled(picked, data.labels[indices], data.classes,
                   None if data.splits is None else data.splits[indices],
                   None if data.groups is None else data.groups[indices])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(round(test_fraction * len(idx))))
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return np.sort(train), np.sort(test)


def group_split(labels: np.ndarray, groups: np.ndarray, test_fraction: float, seed: int,
                source: str = "the labelled data", every_class: bool = True,
                classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) item indices with every group wholly on one side; seeded and deterministic.

    Class balance: each group is binned by its majority label (ties: the lowest label). Within each
    bin, groups in a seeded shuffle go to test while that brings the bin's test patches closer to
    ``test_fraction`` of its patches; each bin with two or more groups puts at least one in test and
    keeps at least one in train. So a class that is the majority of two or more groups is on both
    sides.

    Raises :class:`SimclrPathError` (naming ``source``, and the class by its name in ``classes``)
    with fewer than two groups, and, with ``every_class``, when a class ends up absent from train
    or test. Without ``every_class`` (the linear probe's held-out fifth) a class may be missing
    from one side; when every bin holds a single group, one seeded group goes to test so that
    neither side is empty.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    names, group_of = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        raise SimclrPathError(f"{source}: {len(names)} group (patient/case/slide); a split by group needs at least 2 - "
                              "add groups, or give a --test set")
    rng = np.random.default_rng(seed)
    counts = np.zeros((len(names), labels.max() + 1), dtype=np.int64)  # patches per group and class
    np.add.at(counts, (group_of, labels), 1)
    sizes, majority = counts.sum(1), counts.argmax(1)
    in_test = np.zeros(len(names), dtype=bool)
    for c in np.unique(majority):
        in_test[_test_groups(rng.permutation(np.flatnonzero(majority == c)), sizes, test_fraction)] = True
    if not in_test.any():
        in_test[rng.integers(len(names))] = True
    test_mask = in_test[group_of]
    if every_class:
        _check_every_class(labels, test_mask, source, classes)
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def _test_groups(order: np.ndarray, sizes: np.ndarray, test_fraction: float) -> list[int]:
    """Groups of one majority-label bin (in ``order``) for test: greedily the ones that bring the
    bin's test patches closer to its ``test_fraction``, at least one, never all."""
    target = test_fraction * sizes[order].sum()
    picked, count = [], 0
    for g in order:
        if len(picked) == len(order) - 1:
            break
        if not picked or abs(count + sizes[g] - target) < abs(count - target):
            picked.append(g)
            count += sizes[g]
    return picked


def _check_every_class(labels: np.ndarray, test_mask: np.ndarray, source: str, classes: list[str] | None) -> None:
    for c in np.unique(labels):
        for side, mask in (("train", ~test_mask), ("test", test_mask)):
            if not (labels[mask] == c).any():
                name = repr(classes[c]) if classes is not None else f"index {c}"
                raise SimclrPathError(
                    f"{source}: splitting by group leaves class {name} with no patches in {side}; "
                    "add groups of that class (at least 2), change --test-fraction or --seed, or give a --test set")


def check_groups_disjoint(train_groups: np.ndarray, test_groups: np.ndarray, source: str) -> None:
    """Error when a group has patches on both sides of a given split (a CSV split column, --test)."""
    shared = sorted(set(train_groups.tolist()) & set(test_groups.tolist()))
    if shared:
        raise SimclrPathError(f"{source}: group {shared[0]!r} ({len(shared)} in all) has patches in both train and "
                              "test; put each group wholly on one side, or drop the split to split by group")


def cap_per_class(labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    if cap is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))
