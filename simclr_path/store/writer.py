"""Writing a patch store: atomic creation, then complete slides appended one at a time.

A slide is written under ``/_staging`` and moved to ``/slides`` in one small metadata operation
followed by a flush, so a reader sees a slide complete or not at all. The HDF5 file is created
atomically (temporary file, then rename), so an interrupted first run never leaves a file that is
not a store. The writer holds HDF5's file lock while it has the store open, so a second writer
is refused in one line; readers can still read (see :mod:`simclr_path.store.format`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import h5py
import numpy as np

from simclr_path import __version__
from simclr_path.errors import SimclrPathError
from simclr_path.runtime.console import log
from simclr_path.store.format import (
    FORMAT, QC_KEY, SCHEMA_VERSION, SLIDES, SPEC_KEYS, STAGING, check_is_store, open_h5,
)


#: What HDF5 raises on metadata an interrupted writer left inconsistent ("addr overflow", bad heap).
DAMAGE = (KeyError, RuntimeError, OSError, ValueError)


def _fsync(path: str) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            # Look before writing (never touch a foreign file), with the lock: a store that another
            # writer holds is refused here, in one line.
            with open_h5(self.path, "r", lock=True) as f:
                check_is_store(f, self.path)
                self._check_spec(f, spec_attrs)
        else:
            self._create(spec_attrs)
        self.file = open_h5(self.path, "r+")
        if STAGING in self.file:  # left by an interrupted run
            try:
                del self.file[STAGING]
            except DAMAGE as exc:  # a kill -9 mid metadata write can leave it impossible to unlink
                self._close_quietly()
                self._rebuild(exc)
                self.file = open_h5(self.path, "r+")
        self.file.require_group(STAGING)
        self.file.flush()

    def _close_quietly(self) -> None:
        try:
            self.file.close()
        except DAMAGE:
            pass

    def _rebuild(self, cause: Exception) -> None:
        """Copy the store's complete slides into a fresh file and put it in place; what an interrupted
        run left half-written (its staging area) is dropped and tiled again.

        The old file stays open (HDF5's shared lock: no other writer can start) until the new one,
        flushed to disk, has replaced it, so no slide another process commits can be lost.
        """
        tmp = f"{self.path}.rebuild.tmp"
        with open_h5(self.path, "r", lock=True) as src:  # a lock conflict is its own one-line error
            try:
                with h5py.File(tmp, "w") as dst:
                    for key, value in src.attrs.items():
                        dst.attrs[key] = value
                    dst.create_group(SLIDES)
                    for name in src[SLIDES]:
                        src.copy(src[SLIDES][name], dst[SLIDES], name=name)
                    kept = len(dst[SLIDES])
                _fsync(tmp)
                os.replace(tmp, self.path)
                _fsync(os.path.dirname(os.path.abspath(self.path)))
            except DAMAGE as exc:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise SimclrPathError(
                    f"{self.path}: damaged by an interrupted run ({cause}) and its finished slides cannot be copied "
                    f"out ({exc}); move it aside and run tile again with a new --out"
                ) from None
        log(f"note: {self.path}: an interrupted run left its staging area damaged ({cause}); rebuilt it from its "
            f"{kept} complete slide(s)")

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
        for key in (*SPEC_KEYS, QC_KEY):
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
