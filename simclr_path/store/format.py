"""The HDF5 patch store's format: its layout, names and the checks every reader and writer makes.

Layout (schema 1)::

    /                       attrs: format, schema_version, tool_version, patch_size, target_mpp,
                                   magnification, stride, min_tissue, codec, jpeg_quality, qc
    /slides/<name>/         attrs: source_path, fingerprint, vendor, width, height, level0_mpp,
                                   mpp_source, objective_power, patch_level, scale, num_patches
    /slides/<name>/coords           (N, 2) int64, level-0 top-left (x, y); CLAM/TRIDENT attrs
    /slides/<name>/tissue_fraction  (N,) float32
    /slides/<name>/patches          jpeg: (N,) variable-length uint8; raw: (N, P, P, 3) uint8
    /slides/<name>/qc_scores        (N, K) float32, attr ``names``: the K score names (tiled with QC)
    /slides/<name>/qc_flags         (N,) uint8 bitmask, attr ``reasons``: bit i is reason i (tiled
                                    with QC); slide attrs ``qc_<reason>`` count the patches per reason
    /_staging/<name>/       a slide being written; never read, removed when a run starts

A slide is written under ``/_staging`` and moved to ``/slides`` in one small metadata operation
followed by a flush, so a reader sees a slide complete or not at all. The HDF5 file is created
atomically (temporary file, then rename), so an interrupted first run never leaves a file that is
not a store.

One writer, any number of readers, also while the store is being written. The writer holds HDF5's
file lock, so a second writer is refused. A long-lived reader (a ``PatchStore`` handle) takes
HDF5's shared lock like any HDF5 program, except while a writer holds the lock: then it reads
without one. Short reads (listing the slides, ``info``) never take it, so polling a store never
holds up a writer that is starting. HDF5 does not coordinate a lock-free reader with the writer
(SWMR would, but it forbids creating the groups and variable-length datasets a slide is made of),
so the readers make it safe: only ``/slides`` is listed, where a slide lands after its data is on
disk; each listed slide is checked whole (:func:`check_slide`); a read that caught the writer
mid-flush is retried (:func:`read_store`, :func:`retrying`); and a slide, once listed, is never
changed again.
"""

from __future__ import annotations

import errno
import math
import os
import time
from typing import Callable, TypeVar

import h5py

from simclr_path.errors import SimclrPathError, first_line

FORMAT = "simclr-path patch store"
SCHEMA_VERSION = 1
SLIDES = "slides"
STAGING = "_staging"
#: Root attributes that must match for a run to add slides to an existing store.
SPEC_KEYS = ("patch_size", "target_mpp", "magnification", "stride", "min_tissue", "codec")
#: Root attribute "on"/"off": whether ``tile`` measured QC; must match too, but is absent from
#: stores tiled before QC existed, which then take slides tiled either way.
QC_KEY = "qc"

#: QC reasons a patch can be flagged for, in bit order of ``qc_flags`` (bit i = 1 << i). New
#: reasons are only ever appended, so a stored bit keeps its meaning; readers map names through the
#: dataset's own ``reasons`` attribute.
QC_REASONS = ("pen", "blur", "fold")
#: What ``pretrain``, ``embed`` and ``select`` leave out unless told otherwise.
DEFAULT_EXCLUDE_QC = ("pen", "blur")


def qc_bit(reason: str) -> int:
    """The ``qc_flags`` bit of ``reason``."""
    return 1 << QC_REASONS.index(reason)


def parse_exclude_qc(value) -> tuple[str, ...]:
    """``--exclude-qc`` as a tuple of reasons: a comma list (``"pen,blur"``), ``"none"`` or ``""``
    for nothing, or an iterable of names. An unknown name is a one-line error listing the known."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in QC_REASONS]
    if unknown:
        raise SimclrPathError(
            f"--exclude-qc: unknown QC reason {unknown[0]!r}; give a comma list of {', '.join(QC_REASONS)}, "
            "or 'none'"
        )
    return tuple(dict.fromkeys(names))


T = TypeVar("T")


class TornRead(Exception):
    """What a reader saw is not a consistent store state (a writer was flushing); read again."""


#: How long a writer waits for a lock held by someone else: long enough to ride out a short read
#: (``simclr-path info`` in a loop), short enough to refuse a second writer promptly.
LOCK_WAIT_S = 1.5


def open_h5(path: str, mode: str, *, lock: bool | None = None) -> h5py.File:
    """Open a store, every failure a one-line :class:`SimclrPathError`.

    Writers (``mode`` other than ``"r"``, or ``lock=True``) take HDF5's file lock and fail when
    another process holds it. Readers (``"r"``) take HDF5's shared lock like any HDF5 program
    unless a writer holds the lock, then they read without it; ``lock=False``: never take it, for
    short reads that must not hold up a writer that is starting (see :func:`read_store`).
    """
    try:
        if mode == "r" and not lock:
            return _open_reader(path, try_lock=lock is None)
        return _open_locked(path, mode)
    except FileNotFoundError:
        raise SimclrPathError(f"{path}: no such store; run 'simclr-path tile' first") from None
    except PermissionError:
        raise SimclrPathError(f"{path}: permission denied; choose a path you can write") from None
    except OSError as exc:
        if os.path.isdir(path):
            raise SimclrPathError(f"{path}: is a folder, not a store file") from None
        if _is_lock_conflict(exc):
            raise SimclrPathError(
                f"{path}: another process has this store open (another 'simclr-path tile' writing "
                "it, or a program reading it); wait for it to finish or use another --out"
            ) from None
        if "locking flag" in str(exc):
            raise SimclrPathError(
                f"{path}: this process still reads the store (opened while another process wrote "
                "it); close it (PatchStore.close()) before writing to it"
            ) from None
        if not h5py.is_hdf5(path):
            raise SimclrPathError(
                f"{path}: not an HDF5 patch store (foreign or truncated file); "
                "re-run 'simclr-path tile' into a new --out"
            ) from None
        raise SimclrPathError(
            f"{path}: HDF5 file cannot be opened ({first_line(exc)}); "
            "it may be damaged or open for writing elsewhere"
        ) from None


def _open_locked(path: str, mode: str) -> h5py.File:
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return h5py.File(path, mode)  # HDF5's default: lock where the file system can
        except OSError as exc:
            if not _is_lock_conflict(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _open_reader(path: str, try_lock: bool) -> h5py.File:
    # HDF5 shares one open file per process, which needs one lock setting: whichever way this
    # process opened the file first, a second open has to follow it ("locking flag" errors).
    if try_lock:
        try:
            return h5py.File(path, "r")
        except OSError as exc:  # a writer holds the lock, or this process reads without it
            if not (_is_lock_conflict(exc) or "locking flag" in str(exc)):
                raise
    try:
        return h5py.File(path, "r", locking=False)
    except ValueError:  # an HDF5 build without the locking switch (< 1.10.7 / 1.12.1)
        return h5py.File(path, "r")
    except OSError as exc:  # this process has the file open with the lock
        if "locking flag" not in str(exc):
            raise
        return h5py.File(path, "r")


def _is_lock_conflict(exc: OSError) -> bool:
    """HDF5 could not take the file lock because another process holds it."""
    if isinstance(exc, BlockingIOError) or exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return True
    return "unable to lock file" in str(exc).lower() and exc.errno != errno.ENOSYS


#: A read that fails or sees a torn state is tried this many times at most; after the third try
#: only while the file keeps changing, so a store that is simply damaged fails fast.
READ_ATTEMPTS = 8
#: What a read of a store being written may raise when it catches the writer mid-flush.
TRANSIENT = (TornRead, OSError, KeyError, ValueError, RuntimeError)


def read_store(path: str, read: Callable[[h5py.File], T]) -> T:
    """``read(file)`` on a fresh lock-free reader handle of the store at ``path``.

    A store being written can be caught mid-flush: HDF5 then raises, or ``read`` raises
    :class:`TornRead` when a slide it lists is not whole (:func:`check_slide`). Both are retried on
    a fresh handle; what finally fails is a one-line :class:`SimclrPathError`.
    """
    path = str(path)

    def attempt():
        with open_h5(path, "r", lock=False) as f:  # never holds up a writer, however often run
            check_is_store(f, path)
            return read(f)

    return retrying(path, attempt)


def retrying(path: str, attempt: Callable[[], T], reset: Callable[[], None] | None = None) -> T:
    """``attempt()``, tried again (after ``reset()``) when it fails the way a concurrent writer's
    flush can make a read fail; see :data:`READ_ATTEMPTS`."""
    last: BaseException | None = None
    seen = None
    for number in range(READ_ATTEMPTS):
        try:
            return attempt()
        except SimclrPathError as exc:
            if not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise  # no such store, a folder, no permission: a retry cannot change that
            last = exc
        except TRANSIENT as exc:
            last = exc
        if reset is not None:
            reset()
        seen, before = _signature(path), seen
        if number >= 2 and seen == before:
            break
        time.sleep(0.02 * (number + 1))
    if isinstance(last, SimclrPathError):
        raise last
    raise SimclrPathError(
        f"{path}: cannot be read ({_first_line(last)}); the store may be damaged - tile the "
        "slides into a new --out"
    ) from None


def check_slide(f: h5py.File, name: str) -> tuple[h5py.Group, int]:
    """The group of slide ``name`` and its patch count, checked whole: its pixels are there, as
    many as recorded.

    Raises :class:`TornRead` otherwise (HDF5's own errors propagate): a listed slide is complete by
    construction, so a mismatch means this reader caught the writer mid-flush. Two cheap metadata
    reads per slide, in separate HDF5 objects (the group's attributes, the dataset's shape).
    """
    group = f[SLIDES][name]
    pixels = group.get("patches")
    if pixels is None:
        raise TornRead(f"slide {name}: no pixels")
    n = int(pixels.shape[0])
    recorded = group.attrs.get("num_patches")
    if recorded is not None and int(recorded) != n:
        raise TornRead(f"slide {name}: {n} patches, {int(recorded)} recorded")
    return group, n


def _signature(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _first_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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



def jsonable(value):
    """An HDF5 attribute as JSON: NaN (our "unknown") becomes None."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value
