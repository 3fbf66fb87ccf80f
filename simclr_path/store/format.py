"""The HDF5 patch store's format: its layout, names and the checks every reader and writer makes.

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

import math
import os

import h5py

from simclr_path.errors import SimclrPathError

FORMAT = "simclr-path patch store"
SCHEMA_VERSION = 1
SLIDES = "slides"
STAGING = "_staging"
#: Root attributes that must match for a run to add slides to an existing store.
SPEC_KEYS = ("patch_size", "target_mpp", "magnification", "stride", "min_tissue", "codec")


def open_h5(path: str, mode: str) -> h5py.File:
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



def jsonable(value):
    """An HDF5 attribute as JSON: NaN (our "unknown") becomes None."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value
