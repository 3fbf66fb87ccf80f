"""Files in the layouts other pathology tools read (CLAM, TRIDENT).

CLAM's and TRIDENT's feature extractors take one h5 per slide, named after the slide, holding a
``coords`` dataset (N x 2 int64, level-0 top-left) whose attributes say how to read each patch.
"""

from __future__ import annotations

import os

import h5py

from simclr_path.errors import SimclrPathError
from simclr_path.store.format import SLIDES, check_is_store, open_h5
from simclr_path.store.reader import output_name, slide_keys


def write_coords_files(store_paths: list[str], out_dir: str) -> list[str]:
    """Write ``<out_dir>/<slide key>.h5`` with ``coords`` and its attributes for every slide.

    Files are named by slide key (:class:`~simclr_path.store.reader.PatchStore`), so a slide name
    found in two stores gives two files, never one overwritten by the other. Ingested image
    folders have no slide coordinates and are refused before anything is written.
    """
    slides = []  # (store path, slide name, patch count)
    for store_path in store_paths:
        with open_h5(store_path, "r") as f:
            check_is_store(f, store_path)
            for name, group in f[SLIDES].items():
                coords = group["coords"]
                if coords.attrs.get("patch_size_level0") is None or (coords.shape[0] and coords[()].min() < 0):
                    raise SimclrPathError(
                        f"{store_path}: slide {name} has no slide coordinates (an ingested image folder); coords "
                        "files are for stores made by 'simclr-path tile'")
                slides.append((store_path, name, int(coords.shape[0])))
    # slides with patches are named as PatchStore keys them; empty ones after, never taking a key
    with_patches = [(p, name) for p, name, n in slides if n]
    stems = dict(zip(with_patches, slide_keys(with_patches)))
    used = set(stems.values())
    stems.update({(p, name): output_name(name, p, used) for p, name, n in slides if not n})
    plan = [(p, name, stems[(p, name)]) for p, name, _ in slides]
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise SimclrPathError(f"{out_dir}: cannot create the folder ({exc.strerror})") from None
    written = []
    for store_path, name, stem in plan:
        with open_h5(store_path, "r") as f:
            group = f[SLIDES][name]
            target = os.path.join(out_dir, f"{stem}.h5")
            tmp = target + ".tmp"
            with h5py.File(tmp, "w") as out:
                coords = out.create_dataset("coords", data=group["coords"][()])
                coords.attrs.update(dict(group["coords"].attrs))
                coords.attrs["source_path"] = group.attrs["source_path"]
                coords.attrs["slide_name"] = name
            os.replace(tmp, target)
            written.append(target)
    return written
