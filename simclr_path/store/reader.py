"""Reading patch stores: :class:`PatchStore` (random access over one or more stores),
:class:`PatchSubset`, and the summary ``simclr-path info`` prints."""

from __future__ import annotations

import bisect
import os
from typing import Iterable, Sequence

import h5py
import numpy as np

from simclr_path.errors import SimclrPathError
from simclr_path.store.codecs import read_patch
from simclr_path.store.format import (
    QC_REASONS, SLIDES, TRANSIENT, TornRead, check_slide, jsonable, open_h5, parse_exclude_qc, qc_bit, read_store,
    retrying,
)


class PatchStore:
    """Random access to patches in one or more stores, as a map-style dataset.

    ``len(store)`` counts patches over all stores; ``store[i]`` is an HxWx3 uint8 RGB array;
    ``store.coords(i)`` is ``(slide_key, x, y)`` in level-0 pixels. HDF5 handles are opened lazily
    in each process, so a ``PatchStore`` can be handed to ``DataLoader`` workers.

    Slides are keyed by (store, slide): a slide's *key* is its name, or ``<name>-<store file stem>``
    when another store also has a slide of that name (two shards of two sites, a slide tiled twice):
    then every store's copy is qualified, so keys do not depend on the order of ``paths``. Every command names its per-slide files by the key (``embed``,
    ``select``, ``predict``, ``coords``) and reads per-slide files back by it (``segment --labels``,
    ``select --annotated``), so given the same stores in the same order they always agree.

    A store that ``simclr-path tile`` is still writing can be read: a ``PatchStore`` holds the
    slides that were complete when it was created (slides are never changed once complete).

    QC: indices always cover every stored patch, flagged or not, so an index (and ``coords``,
    ``slide_ranges``) means the same patch whatever is excluded. ``exclude_qc`` names the QC
    reasons to leave out; :meth:`included` / :meth:`indices` / :meth:`kept` give the patches left.
    Slides tiled without QC (and stores older than QC) count as clean.

    Args:
        paths: one store path or several; several are concatenated in the order given.
        exclude_qc: QC reasons to leave out, e.g. ``("pen", "blur")`` or ``"pen,blur"`` (default:
            none; the commands default to :data:`~simclr_path.store.format.DEFAULT_EXCLUDE_QC`).

    Example::

        store = PatchStore("patches.h5", exclude_qc=("pen", "blur"))
        train_set = store.kept()          # only patches without pen ink or blur
        store.qc_flags()[:5]              # bitmask per patch, bit i = QC_REASONS[i]
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], exclude_qc=()):
        self.exclude_qc = parse_exclude_qc(exclude_qc)
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise SimclrPathError("no patch store given")
        self._slides: list[tuple[int, str]] = []  # (path index, slide name)
        self._offsets: list[int] = [0]  # cumulative patch counts
        self.codecs: list[str] = []
        self.labels: list[np.ndarray | None] = []
        self.attrs: list[dict] = []
        for path_index, path in enumerate(self.paths):
            attrs, slides = read_store(path, _complete_slides)
            self.attrs.append(attrs)
            self.codecs.append(str(attrs["codec"]))
            for name, n in slides:
                if n == 0:
                    continue
                self._slides.append((path_index, name))
                self._offsets.append(self._offsets[-1] + n)
        self.patch_size = int(self.attrs[0]["patch_size"])
        for path, attrs in zip(self.paths, self.attrs):
            if int(attrs["patch_size"]) != self.patch_size:
                raise SimclrPathError(
                    f"{path}: patch size {attrs['patch_size']} differs from {self.patch_size} "
                    f"in {self.paths[0]}; re-tile so all stores share one patch size"
                )
        self._files: dict[int, h5py.File] = {}
        self._pixels: dict[int, h5py.Dataset] = {}  # slide -> its patches dataset, opened once per process
        self._pid = os.getpid()
        # each slide's key, unique over the stores and independent of their order (class docstring)
        self._keys = slide_keys([(self.paths[p], name) for p, name in self._slides])
        self._key_index = {key: i for i, key in enumerate(self._keys)}
        self._qc_flags: np.ndarray | None = None

    def __len__(self) -> int:
        return self._offsets[-1]

    @property
    def slide_names(self) -> list[str]:
        """The key of every slide with patches, in store order (see the class docstring)."""
        return list(self._keys)

    def slide_ranges(self) -> list[tuple[str, int, int]]:
        """(slide key, first patch index, end index) of every slide with patches, in order."""
        return [(key, self._offsets[i], self._offsets[i + 1]) for i, key in enumerate(self._keys)]

    def slide_source(self, key: str) -> tuple[str, str]:
        """``(store path, slide name in that store)`` of the slide with key ``key``."""
        path_index, name = self._slides[self._slide_number(key)]
        return self.paths[path_index], name

    def _slide_number(self, key: str) -> int:
        number = self._key_index.get(key)
        if number is None:
            raise KeyError(key)
        return number

    def slide_group(self, key: str) -> h5py.Group:
        """The HDF5 group of the slide with key ``key`` (coords and their attributes, labels, ...)."""
        number = self._slide_number(key)
        return self._read(number, lambda: self._group(number))

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"patch index {index} out of range for {len(self)} patches")
        slide = bisect.bisect_right(self._offsets, index) - 1
        return slide, index - self._offsets[slide]

    def _group(self, slide: int) -> h5py.Group:
        if self._pid != os.getpid():  # forked into a worker: never share HDF5 handles
            self._files, self._pixels, self._pid = {}, {}, os.getpid()
        path_index, name = self._slides[slide]
        f = self._files.get(path_index)
        if f is None:
            f = self._files[path_index] = open_h5(self.paths[path_index], "r")
        return f[SLIDES][name]

    def _read(self, slide: int, read):
        """``read()``, retried on fresh handles if it fails while a writer is flushing the store."""
        path_index = self._slides[slide][0]
        return retrying(self.paths[path_index], read, reset=lambda: self._forget(path_index))

    def _forget(self, path_index: int) -> None:
        """Drop this process's handles into one store, so the next read opens it afresh."""
        for slide in [s for s in self._pixels if self._slides[s][0] == path_index]:
            del self._pixels[slide]
        f = self._files.pop(path_index, None)
        if f is not None:
            try:
                f.close()
            except Exception:
                pass

    def __getitem__(self, index: int) -> np.ndarray:
        slide, local = self._locate(int(index))
        codec = self.codecs[self._slides[slide][0]]
        try:
            return read_patch(self._patches(slide), local, codec)
        except TRANSIENT:  # rare: a store being written, caught mid-flush; retry on fresh handles
            return self._read(slide, lambda: read_patch(self._patches(slide), local, codec))

    def _patches(self, slide: int) -> h5py.Dataset:
        """The slide's pixel dataset; the handle is kept, so a loader worker resolves each HDF5 path once."""
        dataset = self._pixels.get(slide) if self._pid == os.getpid() else None
        if dataset is None:
            dataset = self._pixels[slide] = self._group(slide)["patches"]
        return dataset

    def coords(self, index: int) -> tuple[str, int, int]:
        slide, local = self._locate(int(index))
        x, y = self._read(slide, lambda: self._group(slide)["coords"][local])
        return self._keys[slide], int(x), int(y)

    def qc_flags(self) -> np.ndarray:
        """(len(self),) uint8 QC bitmask of every patch, bit ``i`` = ``QC_REASONS[i]``; 0 for
        patches of slides tiled without QC. Read once (one byte per patch)."""
        if self._qc_flags is None:
            flags = np.zeros(len(self), dtype=np.uint8)
            for slide in range(len(self._slides)):
                start, end = self._offsets[slide], self._offsets[slide + 1]
                flags[start:end] = self._read(slide, lambda slide=slide: _slide_qc_flags(self._group(slide)))
            self._qc_flags = flags
        return self._qc_flags

    def included(self) -> np.ndarray:
        """(len(self),) bool: the patch has none of the ``exclude_qc`` reasons."""
        mask = 0
        for reason in self.exclude_qc:
            mask |= qc_bit(reason)
        if not mask:
            return np.ones(len(self), dtype=bool)
        return (self.qc_flags() & mask) == 0

    def indices(self) -> np.ndarray:
        """int64 indices of the included patches, ascending."""
        return np.flatnonzero(self.included()).astype(np.int64)

    def kept(self) -> "PatchStore | PatchSubset":
        """The included patches as a dataset: this store when nothing is left out, else a
        :class:`PatchSubset`."""
        indices = self.indices()
        return self if len(indices) == len(self) else PatchSubset(self, indices)

    def label(self, index: int) -> int:
        """Class label of a patch from an ingested labelled folder; -1 when unlabelled."""
        slide, local = self._locate(int(index))

        def read():
            group = self._group(slide)
            return int(group["labels"][local]) if "labels" in group else -1

        return self._read(slide, read)

    def close(self) -> None:
        self._pixels = {}
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}
        state["_pixels"] = {}
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class PatchSubset:
    """Some patches of a :class:`PatchStore`, by index: ``subset[i]`` is ``store[indices[i]]``."""

    def __init__(self, store: PatchStore, indices):
        self.store, self.indices = store, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.store[self.indices[i]]


def _slide_qc_flags(group: h5py.Group) -> np.ndarray:
    """A slide's ``qc_flags`` in this version's bit order (mapped by the dataset's ``reasons``
    attribute; a reason this version does not know is dropped); zeros when it has none."""
    n = int(group["patches"].shape[0])
    if "qc_flags" not in group:
        return np.zeros(n, dtype=np.uint8)
    dataset = group["qc_flags"]
    stored = dataset[()].astype(np.uint8)
    if len(stored) != n:
        raise TornRead(f"qc_flags: {len(stored)} entries for {n} patches")
    names = [str(r) for r in dataset.attrs.get("reasons", QC_REASONS)]
    if tuple(names) == QC_REASONS[: len(names)]:
        return stored
    flags = np.zeros(n, dtype=np.uint8)
    for bit, name in enumerate(names):
        if name in QC_REASONS:
            flags[(stored >> bit) & 1 == 1] |= qc_bit(name)
    return flags


def _qc_counts(flags: np.ndarray) -> dict:
    """Patches per QC reason, and ``clean`` (no reason)."""
    out = {reason: int(np.count_nonzero(flags & qc_bit(reason))) for reason in QC_REASONS}
    out["clean"] = int(np.count_nonzero(flags == 0))
    return out


def output_name(name: str, store_path: str, used: set[str], qualify: bool = False) -> str:
    """File stem for the outputs of slide ``name`` of the store at ``store_path`` (``embed``,
    ``select``, ``predict``): the name, or ``<name>-<store file stem>`` (then ``-2``, ``-3``...)
    when ``qualify`` is set or the name is taken. The stem is added to ``used``."""
    stem = name
    if qualify or stem in used:
        stem = base = f"{name}-{os.path.splitext(os.path.basename(store_path))[0]}"
        k = 2
        while stem in used:
            stem, k = f"{base}-{k}", k + 1
    used.add(stem)
    return stem


def slide_keys(slides: Sequence[tuple[str, str]]) -> list[str]:
    """The key of each ``(store path, slide name)`` (see :class:`PatchStore`): the name when no other
    store has a slide of that name, else ``<name>-<store file stem>`` for *every* store that has one,
    so a key never depends on the order the stores are given in."""
    counts: dict[str, int] = {}
    for _, name in slides:
        counts[name] = counts.get(name, 0) + 1
    used = {name for name, n in counts.items() if n == 1}
    return [name if counts[name] == 1 else output_name(name, path, used, qualify=True) for path, name in slides]


def _listed(f: h5py.File) -> list[str]:
    """Names of the complete slides (``/_staging`` holds the others and is never read)."""
    names = list(f[SLIDES].keys())
    if len(set(names)) != len(names):
        raise TornRead("a slide is listed twice")
    return names


def _complete_slides(f: h5py.File) -> tuple[dict, list[tuple[str, int]]]:
    """Root attributes and (name, patch count) of every complete slide, each checked whole."""
    return dict(f.attrs), [(name, check_slide(f, name)[1]) for name in _listed(f)]


def store_summary(paths: Iterable[str]) -> dict:
    """What ``simclr-path info`` prints: totals and one entry per slide.

    A store being written shows the slides complete so far.
    """
    out = {"stores": [], "total_patches": 0}
    for path in paths:
        out["stores"].append(read_store(str(path), lambda f, path=path: _summary(f, str(path))))
        out["total_patches"] += out["stores"][-1]["patches"]
    return out


def _summary(f: h5py.File, path: str) -> dict:
    slides = []
    for name in _listed(f):
        g, n = check_slide(f, name)
        a = g.attrs
        slides.append(
            {
                "name": name,
                "patches": n,
                "mpp": jsonable(a.get("level0_mpp")),
                "mpp_source": str(a.get("mpp_source")),
                "patch_level": int(a.get("patch_level", 0)),
                "source_path": str(a.get("source_path")),
                "qc": _qc_counts(_slide_qc_flags(g)) if "qc_flags" in g else None,
            }
        )
    measured = [s["qc"] for s in slides if s["qc"] is not None]
    qc_total = {key: sum(c[key] for c in measured) for key in (*QC_REASONS, "clean")} if measured else None
    return {
        "path": path,
        "patches": sum(s["patches"] for s in slides),
        "patch_size": int(f.attrs["patch_size"]),
        "target_mpp": jsonable(f.attrs.get("target_mpp")),
        "magnification": jsonable(f.attrs.get("magnification")),
        "codec": str(f.attrs["codec"]),
        "qc": qc_total,
        "slides": slides,
    }
