"""Files in the layouts other pathology tools read (CLAM, TRIDENT).

CLAM's and TRIDENT's feature extractors take one h5 per slide, named after the slide, holding a
``coords`` dataset (N x 2 int64, level-0 top-left) whose attributes say how to read each patch.
"""

from __future__ import annotations

import os

import h5py

from simclr_path.errors import SimclrPathError
from simclr_path.store.format import SLIDES, check_is_store, open_h5


def write_coords_files(store_paths: list[str], out_dir: str) -> list[str]:
    """Write ``<out_dir>/<slide>.h5`` with ``coords`` and its attributes for every slide."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise SimclrPathError(f"{out_dir}: cannot create the folder ({exc.strerror})") from None
    written = []
    for store_path in store_paths:
        with open_h5(store_path, "r") as f:
            check_is_store(f, store_path)
            for name, group in f[SLIDES].items():
                target = os.path.join(out_dir, f"{name}.h5")
                tmp = target + ".tmp"
                with h5py.File(tmp, "w") as out:
                    coords = out.create_dataset("coords", data=group["coords"][()])
                    coords.attrs.update(dict(group["coords"].attrs))
                    coords.attrs["source_path"] = group.attrs["source_path"]
                os.replace(tmp, target)
                written.append(target)
    return written
