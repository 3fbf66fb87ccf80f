"""Region features and region entropy, from patch-level values.

A region's feature is the mean of its patches' encoder features, L2-normalised afterwards, so
k-center measures distances between regions on the unit sphere as the encoder's cosine geometry
does. Patch features are computed here exactly as ``embed`` computes them (same resizing,
normalisation and model), or read from an ``embed`` output folder (``features.h5``, matched to the
store's patches by slide file name and level-0 (x, y)).

Both paths go through the patches in chunks and add each chunk into per-region float32 sums, so
memory holds the (regions, D) sums, never all patch features at once (with --region-size 1 that
is every patch's feature, as it must be).
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import torch

from simclr_path.errors import SimclrPathError, first_line
from simclr_path.selection.regions import Regions, slide_coords
from simclr_path.store import PatchStore, PatchSubset

#: Patches whose features are computed (or read) at a time.
CHUNK_PATCHES = 65536
_EMBED_HINT = "run 'simclr-path embed' with this encoder on these stores"


def patches_of(regions: Regions, needed: np.ndarray | None = None) -> np.ndarray:
    """Positions in ``regions.members`` of the patches of the ``needed`` regions ((R,) bool; None: all)."""
    if needed is None:
        return np.arange(len(regions.members))
    return np.flatnonzero(np.asarray(needed, dtype=bool)[regions.patch_region()])


def region_features_from_encoder(encoder: str, store: PatchStore, regions: Regions, device: torch.device,
                                 batch_size: int = 128, workers: int = 2, needed: np.ndarray | None = None,
                                 progress=None) -> torch.Tensor:
    """(R, D) float32 L2-normalised region features, running ``encoder`` over the regions' patches.

    ``needed``: (R,) bool, the regions to compute (``hybrid`` needs only its pool and the annotated
    regions); the others' rows are zero.
    """
    from simclr_path.downstream.encoder import load_encoder
    from simclr_path.engine.features import extract_features

    model, meta = load_encoder(encoder)
    model = model.to(device)
    patch_region = regions.patch_region()
    positions = patches_of(regions, needed)
    if not len(positions):
        raise ValueError("no region patches to compute features of")
    sums = None
    for first in range(0, len(positions), CHUNK_PATCHES):
        chunk = positions[first:first + CHUNK_PATCHES]
        features = extract_features(model, PatchSubset(store, regions.members[chunk].tolist()),
                                    meta["input_size"][-1], meta["mean"], meta["std"], device,
                                    batch_size=batch_size, workers=workers, on_batch=progress)
        if sums is None:  # the feature size is what the model gives
            sums = torch.zeros(len(regions), features.shape[1])
        sums.index_add_(0, torch.from_numpy(patch_region[chunk]), features)
    return _normalised_means(sums, regions)


def region_features_from_embed(features_dir: str, encoder: str, regions: Regions) -> torch.Tensor:
    """(R, D) float32 L2-normalised region features from ``features_dir/features.h5`` of ``embed``.

    The file must hold these stores' slides embedded with this encoder (by sha256, when the file
    records it); every region patch is found by (slide file name, level-0 x, y).
    """
    from simclr_path.downstream.embed import COMBINED
    from simclr_path.runtime.files import file_sha256

    path = os.path.join(features_dir, COMBINED)
    if not os.path.isfile(path):
        raise SimclrPathError(f"{features_dir}: no {COMBINED} (not an embed output folder); {_EMBED_HINT} "
                              f"with --out {features_dir}")
    try:
        with h5py.File(path, "r") as f:
            recorded = str(f.attrs.get("encoder_sha256", ""))
            if recorded and recorded != file_sha256(encoder):
                raise SimclrPathError(f"{path}: features of another encoder than {encoder}; {_EMBED_HINT}")
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["slide_names"][()]]
            rows = _feature_rows(path, names, f["slide_index"][()], f["coords"][()], regions)
            dataset = f["features"]
            sums = torch.zeros(len(regions), dataset.shape[1])
            # read the file in contiguous blocks (fast in HDF5), adding the rows that are region patches
            patch_region = regions.patch_region()
            by_row = np.argsort(rows)
            sorted_rows = rows[by_row]
            for first in range(0, dataset.shape[0], CHUNK_PATCHES):
                lo, hi = np.searchsorted(sorted_rows, [first, first + CHUNK_PATCHES])
                if lo == hi:
                    continue
                block = dataset[first:first + CHUNK_PATCHES]
                members = by_row[lo:hi]
                sums.index_add_(0, torch.from_numpy(patch_region[members]),
                                torch.from_numpy(block[sorted_rows[lo:hi] - first]))
    except (OSError, KeyError) as exc:
        raise SimclrPathError(f"{path}: not a readable embed features file ({first_line(exc)}); "
                              f"{_EMBED_HINT}") from None
    return _normalised_means(sums, regions)


def _feature_rows(path: str, names: list[str], slide_index: np.ndarray, coords: np.ndarray,
                  regions: Regions) -> np.ndarray:
    """Row of ``features.h5`` of each entry of ``regions.members``."""
    rows = np.empty(len(regions.members), dtype=np.int64)
    position = {name: number for number, name in enumerate(names)}
    by_slide = np.argsort(slide_index, kind="stable")
    bounds = np.searchsorted(slide_index[by_slide], np.arange(len(names) + 1))
    for number, slide in enumerate(regions.slides):
        slide_regions = regions.of_slide(number)
        if not len(slide_regions):
            continue
        first, last = regions.offsets[slide_regions[0]], regions.offsets[slide_regions[-1] + 1]
        if slide.file_name not in position:
            raise SimclrPathError(f"{path}: has no features of slide {slide.file_name}; {_EMBED_HINT}")
        k = position[slide.file_name]
        slide_rows = by_slide[bounds[k]:bounds[k + 1]]
        wanted = _xy_key(slide_coords(slide)[regions.members[first:last] - slide.start])
        have = _xy_key(coords[slide_rows])
        sorted_have = np.argsort(have)
        found = np.searchsorted(have[sorted_have], wanted).clip(max=max(len(have) - 1, 0))
        if not len(have) or not (have[sorted_have][found] == wanted).all():
            raise SimclrPathError(f"{path}: lacks features of some patches of slide {slide.file_name} "
                                  f"(re-tiled since?); {_EMBED_HINT}")
        rows[first:last] = slide_rows[sorted_have[found]]
    return rows


def _xy_key(coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.int64)
    return (coords[:, 0] << 32) + coords[:, 1]


def _normalised_means(sums: torch.Tensor, regions: Regions) -> torch.Tensor:
    counts = torch.from_numpy(np.diff(regions.offsets)).clamp_min(1)[:, None]
    return torch.nn.functional.normalize(sums.div_(counts), dim=1)


def region_entropy(model_run: str, store: PatchStore, regions: Regions, device: str = "auto", batch_size: int = 32,
                   workers: int = 2) -> np.ndarray:
    """(R,) float64 mean over each region's patches of the segment model's mean pixel entropy."""
    from simclr_path.segment.infer import patch_entropy

    values = np.asarray(patch_entropy(model_run, store, regions.members, device=device, batch_size=batch_size,
                                      workers=workers), dtype=np.float64)
    sums = np.bincount(regions.patch_region(), weights=values, minlength=len(regions))
    return sums / np.maximum(np.diff(regions.offsets), 1)
