"""``simclr-path embed``: encoder features for every patch, in the layouts MIL code reads.

Output folder::

    features/h5_files/<slide>.h5   features (N, D) float32 and coords (N, 2) int64 with the store's
                                   coords attributes - CLAM's and TRIDENT's per-slide feature files
    features/pt_files/<slide>.pt   the same features as a torch tensor (CLAM's MIL datasets)
    features/features.h5           all patches: features, coords, slide_index; slide_names
                                   (active-learning pipelines pick patches from here)

Each file is written to a temporary name and renamed, so a stopped run leaves no half-written file.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import torch

from simclr_path.engine.features import extract_features
from simclr_path.errors import SimclrPathError
from simclr_path.store import PatchStore, PatchSubset


def _atomic_h5(path: str):
    return h5py.File(f"{path}.tmp", "w")


def embed_stores(encoder_path: str, stores: list[str], out_dir: str, device: str = "auto", batch_size: int = 256,
                 workers: int = 2, progress=None) -> dict:
    from simclr_path.downstream.encoder import load_encoder
    from simclr_path.runtime.device import resolve_device

    dev = resolve_device(device)
    model, meta = load_encoder(encoder_path)
    model = model.to(dev)
    store = PatchStore(stores)
    if len(store) == 0:
        raise SimclrPathError(f"{', '.join(stores)}: no patches to embed")
    size, mean, std = meta["input_size"][-1], meta["mean"], meta["std"]
    try:
        for sub in ("h5_files", "pt_files"):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    except OSError as exc:
        raise SimclrPathError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from None
    names, all_features, all_coords, slide_index = [], [], [], []
    for number, (name, start, end) in enumerate(store.slide_ranges()):
        patches = PatchSubset(store, range(start, end))
        features = extract_features(model, patches, size, mean, std, dev, batch_size, workers, progress)
        group = store.slide_group(name)
        coords = group["coords"][()]
        target = os.path.join(out_dir, "h5_files", f"{name}.h5")
        with _atomic_h5(target) as f:
            f.create_dataset("features", data=features.numpy().astype(np.float32))
            c = f.create_dataset("coords", data=coords)
            c.attrs.update(dict(group["coords"].attrs))
            f.attrs.update({"encoder": os.path.abspath(encoder_path), "timm_model": meta["timm_model"],
                            "slide": name, "source_path": str(group.attrs.get("source_path", ""))})
        os.replace(f"{target}.tmp", target)
        pt = os.path.join(out_dir, "pt_files", f"{name}.pt")
        torch.save(features.clone(), f"{pt}.tmp")
        os.replace(f"{pt}.tmp", pt)
        names.append(name)
        all_features.append(features.numpy())
        all_coords.append(coords)
        slide_index.append(np.full(len(features), number, dtype=np.int64))
    combined = os.path.join(out_dir, "features.h5")
    with _atomic_h5(combined) as f:
        f.create_dataset("features", data=np.concatenate(all_features).astype(np.float32))
        f.create_dataset("coords", data=np.concatenate(all_coords))
        f.create_dataset("slide_index", data=np.concatenate(slide_index))
        f.create_dataset("slide_names", data=np.array(names, dtype=h5py.string_dtype()))
        f.attrs.update({"encoder": os.path.abspath(encoder_path), "timm_model": meta["timm_model"]})
    os.replace(f"{combined}.tmp", combined)
    dim = all_features[0].shape[1]
    return {"out": os.path.abspath(out_dir), "slides": len(names), "patches": len(store), "feature_dim": int(dim),
            "timm_model": meta["timm_model"], "device": str(dev)}

