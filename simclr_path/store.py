"""The HDF5 patch store: layout, crash-safe writing, and :class:`PatchStore` for reading.

Layout (schema 1)::

    /                       attrs: format, schema_version, tool_version, patch_size, target_mpp,
                                   magnification, stride, min_tissue, codec, jpeg_quality
    /slides/<name>/         attrs: source_path, fingerprint, vendor, width, height, level0_mpp,
                                   mpp_source, objective_power, patch_level, scale, num_patches
    /slides/<name>/coords           (N, 2) int64, level-0 top-left (x, y); CLAM/TRIDENT attrs
    /slides/<name>/tissue_fraction  (N,) float32
    /slides/<name>/patches          jpeg: (N,) variable-length uint8; raw: (N, P, P, 3) uint8
    /_staging/<name>/       a slide being written; never read, removed when a run starts

A slide is written under ``/_staging`` and moved to ``/slides`` in one small metadata operation
followed by a flush, so a reader sees a slide complete or not at all. The HDF5 file is created
atomically (temporary file, then rename), so an interrupted first run never leaves a file that is
not a store.
"""

from __future__ import annotations

import bisect
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from simclr_path import __version__
from simclr_path.codecs import read_patch
from simclr_path.errors import SimclrPathError

FORMAT = "simclr-path patch store"
SCHEMA_VERSION = 1
SLIDES = "slides"
STAGING = "_staging"
#: Root attributes that must match for a run to add slides to an existing store.
SPEC_KEYS = ("patch_size", "target_mpp", "magnification", "stride", "min_tissue", "codec")


def _open_h5(path: str, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise SimclrPathError(f"{path}: no such store; run 'simclr-path tile' first") from None
    except PermissionError:
        raise SimclrPathError(f"{path}: permission denied; choose a path you can write") from None
    except OSError as exc:
        if os.path.isdir(path):
            raise SimclrPathError(f"{path}: is a folder, not a store file") from None
        if not h5py.is_hdf5(path):
            raise SimclrPathError(
                f"{path}: not an HDF5 patch store (foreign or truncated file); "
                "re-run 'simclr-path tile' into a new --out"
            ) from None
        raise SimclrPathError(
            f"{path}: HDF5 file cannot be opened ({str(exc).splitlines()[0]}); "
            "it may be damaged or open for writing elsewhere"
        ) from None


def check_is_store(f: h5py.File, path: str) -> None:
    if f.attrs.get("format") != FORMAT:
        raise SimclrPathError(
            f"{path}: an HDF5 file that is not a simclr-path patch store; "
            "choose another path (or 'simclr-path ingest' an image folder)"
        )
    version = int(f.attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise SimclrPathError(
            f"{path}: store schema {version} is newer than this simclr-path reads "
            f"({SCHEMA_VERSION}); upgrade simclr-path"
        )


def _same(a, b) -> bool:
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9)
    return a == b


class StoreWriter:
    """Appends complete slides to a store; one writer per file (the tiling process)."""

    def __init__(self, path: str | os.PathLike, spec_attrs: dict):
        self.path = str(path)
        parent = Path(self.path).resolve().parent
        if not parent.is_dir():
            raise SimclrPathError(f"{self.path}: folder {parent} does not exist; create it first")
        if os.path.exists(self.path):
            with _open_h5(self.path, "r") as f:  # look before writing: never touch a foreign file
                check_is_store(f, self.path)
                self._check_spec(f, spec_attrs)
        else:
            self._create(spec_attrs)
        self.file = _open_h5(self.path, "a")
        if STAGING in self.file:  # left by an interrupted run
            del self.file[STAGING]
        self.file.require_group(STAGING)
        self.file.flush()

    def _create(self, spec_attrs: dict) -> None:
        tmp = f"{self.path}.tmp"
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = FORMAT
                f.attrs["schema_version"] = SCHEMA_VERSION
                f.attrs["tool_version"] = __version__
                for key, value in spec_attrs.items():
                    f.attrs[key] = value
                f.create_group(SLIDES)
            os.replace(tmp, self.path)
        except PermissionError:
            raise SimclrPathError(f"{self.path}: permission denied; choose an --out you can write") from None
        except OSError as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise SimclrPathError(f"{self.path}: cannot create the store ({exc.strerror or exc})") from None

    def _check_spec(self, f: h5py.File, spec_attrs: dict) -> None:
        for key in SPEC_KEYS:
            have, want = f.attrs.get(key), spec_attrs.get(key)
            if have is not None and want is not None and not _same(have, want):
                raise SimclrPathError(
                    f"{self.path}: this store was tiled with {key}={have}, not {want}; "
                    "use the same options or a new --out"
                )

    def completed(self) -> dict[str, str]:
        """Fingerprint -> slide name of every complete slide."""
        return {g.attrs["fingerprint"]: name for name, g in self.file[SLIDES].items()}

    def names(self) -> set[str]:
        return set(self.file[SLIDES].keys())

    def begin(self, name: str) -> h5py.Group:
        staging = self.file[STAGING]
        if name in staging:
            del staging[name]
        return staging.create_group(name)

    def commit(self, name: str) -> None:
        # First make the staged slide durable (datasets, variable-length heaps), then publish it
        # with one small metadata change. Flushing only after the move could write the new link
        # before the data it points to.
        self.file.flush()
        self.file.move(f"{STAGING}/{name}", f"{SLIDES}/{name}")
        self.file.flush()

    def discard(self, name: str) -> None:
        if name in self.file[STAGING]:
            del self.file[STAGING][name]

    def close(self) -> None:
        if self.file.id.valid:
            if STAGING in self.file:
                del self.file[STAGING]
            self.file.close()


class PatchStore:
    """Random access to patches in one or more stores, as a map-style dataset.

    ``len(store)`` counts patches over all stores; ``store[i]`` is an HxWx3 uint8 RGB array;
    ``store.coords(i)`` is ``(slide_name, x, y)`` in level-0 pixels. HDF5 handles are opened lazily
    in each process, so a ``PatchStore`` can be handed to ``DataLoader`` workers.

    Args:
        paths: one store path or several; several are concatenated in the order given.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
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
            with _open_h5(path, "r") as f:
                check_is_store(f, path)
                self.attrs.append(dict(f.attrs))
                self.codecs.append(str(f.attrs["codec"]))
                for name, group in f[SLIDES].items():
                    n = int(group["coords"].shape[0])
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
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._offsets[-1]

    @property
    def slide_names(self) -> list[str]:
        return [name for _, name in self._slides]

    def slide_ranges(self) -> list[tuple[str, int, int]]:
        """(slide name, first patch index, end index) of every slide with patches, in order."""
        return [(name, self._offsets[i], self._offsets[i + 1]) for i, (_, name) in enumerate(self._slides)]

    def slide_group(self, name: str) -> h5py.Group:
        """The HDF5 group of slide ``name`` (coords and their attributes, labels, ...)."""
        for i, (_, slide_name) in enumerate(self._slides):
            if slide_name == name:
                return self._group(i)
        raise KeyError(name)

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"patch index {index} out of range for {len(self)} patches")
        slide = bisect.bisect_right(self._offsets, index) - 1
        return slide, index - self._offsets[slide]

    def _group(self, slide: int) -> h5py.Group:
        if self._pid != os.getpid():  # forked into a worker: never share HDF5 handles
            self._files, self._pid = {}, os.getpid()
        path_index, name = self._slides[slide]
        f = self._files.get(path_index)
        if f is None:
            f = self._files[path_index] = _open_h5(self.paths[path_index], "r")
        return f[SLIDES][name]

    def __getitem__(self, index: int) -> np.ndarray:
        slide, local = self._locate(int(index))
        codec = self.codecs[self._slides[slide][0]]
        return read_patch(self._group(slide)["patches"], local, codec)

    def coords(self, index: int) -> tuple[str, int, int]:
        slide, local = self._locate(int(index))
        x, y = self._group(slide)["coords"][local]
        return self._slides[slide][1], int(x), int(y)

    def label(self, index: int) -> int:
        """Class label of a patch from an ingested labelled folder; -1 when unlabelled."""
        slide, local = self._locate(int(index))
        group = self._group(slide)
        return int(group["labels"][local]) if "labels" in group else -1

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}
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


def store_summary(paths: Iterable[str]) -> dict:
    """What ``simclr-path info`` prints: totals and one entry per slide."""
    out = {"stores": [], "total_patches": 0}
    for path in paths:
        with _open_h5(str(path), "r") as f:
            check_is_store(f, str(path))
            slides = []
            for name, g in f[SLIDES].items():
                a = g.attrs
                slides.append(
                    {
                        "name": name,
                        "patches": int(g["coords"].shape[0]),
                        "mpp": jsonable(a.get("level0_mpp")),
                        "mpp_source": str(a.get("mpp_source")),
                        "patch_level": int(a.get("patch_level", 0)),
                        "source_path": str(a.get("source_path")),
                    }
                )
            total = sum(s["patches"] for s in slides)
            out["stores"].append(
                {
                    "path": str(path),
                    "patches": total,
                    "patch_size": int(f.attrs["patch_size"]),
                    "target_mpp": jsonable(f.attrs.get("target_mpp")),
                    "magnification": jsonable(f.attrs.get("magnification")),
                    "codec": str(f.attrs["codec"]),
                    "slides": slides,
                }
            )
            out["total_patches"] += total
    return out


def jsonable(value):
    """An HDF5 attribute as JSON: NaN (our "unknown") becomes None."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value
