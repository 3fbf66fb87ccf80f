"""``simclr-path select``: rank regions of the stored slides for a pathologist to annotate next.

Reads top to bottom: check the options; cut the slides into regions
(:mod:`~simclr_path.selection.regions`); find the regions already annotated
(:mod:`~simclr_path.selection.annotated`); check the budget; compute what the strategy needs
(region entropy, then region features - for ``hybrid`` only of its pool of uncertain regions and
the annotated ones: :mod:`~simclr_path.selection.features`); rank
(:mod:`~simclr_path.selection.strategies`); write the proposals
(:mod:`~simclr_path.selection.outputs`). Every input is checked before anything is written.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from simclr_path.errors import SimclrPathError, check_loader_options
from simclr_path.runtime.console import Reporter
from simclr_path.runtime.device import resolve_device
from simclr_path.selection.annotated import annotated_regions
from simclr_path.selection.features import (
    patches_of, region_entropy, region_features_from_embed, region_features_from_encoder,
)
from simclr_path.selection.outputs import write_outputs
from simclr_path.selection.regions import build_regions
from simclr_path.selection.strategies import (
    NEEDS_ENTROPY, NEEDS_FEATURES, STRATEGIES, check_budget, hybrid_candidates, hybrid_pool, select_regions,
)
from simclr_path.store import PatchStore

#: Proposals listed in the JSON summary (all of them are in regions.csv).
SUMMARY_ROWS = 10
#: Largest batch for the segmentation model (full-resolution decoder activations per patch).
SEGMENT_BATCH = 32


def select_regions_for_annotation(encoder: str, stores: list[str], out: str, *, budget: int, region_size: int = 4,
                                  strategy: str = "kcenter", features_dir: str | None = None,
                                  model: str | None = None, annotated: str | None = None, pool: int | None = None,
                                  seed: int = 0, device: str = "auto", batch_size: int = 128, workers: int = 2,
                                  exclude_qc=(), reporter: Reporter | None = None, mask_format: str = "auto") -> dict:
    """Propose ``budget`` regions of ``stores`` to annotate next and write them into ``out``.

    Args:
        encoder: exported encoder (``simclr-path export``), whose features ``kcenter``/``hybrid`` use.
        stores: patch stores made by ``simclr-path tile``.
        out: output folder (``<slide>.geojson``, ``<slide>.thumbnail.png``, ``regions.csv``).
        budget: number of regions to propose.
        region_size: region side K in patches (K x K patches; 1: single patches).
        strategy: ``random``, ``kcenter``, ``entropy`` or ``hybrid`` (see
            :mod:`~simclr_path.selection.strategies`).
        features_dir: an ``embed`` output folder of this encoder on these stores, instead of running
            the encoder.
        model: a ``simclr-path segment`` run folder (``entropy``, ``hybrid``).
        annotated: folder of ``<slide>.geojson`` / ``<slide>.png`` already annotated; their regions
            are never proposed.
        mask_format: what the ``annotated`` masks' values mean (``auto``, ``index``, ``binary``; see
            :mod:`simclr_path.segment.masks`).
        pool: ``hybrid``: how many of the most uncertain regions to diversify among (default 4 x budget).
        seed: ``random``'s seed.
        device, batch_size, workers: for running the encoder or the segmentation model (which gets
            at most :data:`SEGMENT_BATCH` patches a batch).
        exclude_qc: tiling QC reasons whose patches are left out of every region (``"pen,blur"``; see
            :class:`~simclr_path.store.reader.PatchStore`).
        reporter: progress on stderr (default: none).

    Returns:
        The summary ``select`` prints: counts, the first proposals, the files written.
    """
    started = time.perf_counter()
    reporter = reporter or Reporter(enabled=False)
    _check_options(encoder, out, budget, region_size, strategy, features_dir, model, annotated, batch_size, workers)
    store = PatchStore(stores, exclude_qc=exclude_qc)
    try:
        regions = build_regions(store, region_size)
        is_annotated = (annotated_regions(annotated, regions, log=reporter.log, mask_format=mask_format) if annotated
                        else np.zeros(len(regions), dtype=bool))
        candidates = int((~is_annotated).sum())
        check_budget(budget, candidates, int(is_annotated.sum()))
        if strategy == "hybrid":
            hybrid_pool(budget, pool, candidates)
        dev = resolve_device(device)

        entropy = features = None
        if strategy in NEEDS_ENTROPY:
            entropy = region_entropy(model, store, regions, device=str(dev), batch_size=min(batch_size, SEGMENT_BATCH),
                                     workers=workers)
        if strategy in NEEDS_FEATURES and features_dir:
            features = region_features_from_embed(features_dir, encoder, regions)
        elif strategy in NEEDS_FEATURES:
            needed = None  # hybrid: only its pool of uncertain regions and the annotated ones
            if strategy == "hybrid":
                needed = is_annotated.copy()
                needed[hybrid_candidates(entropy, is_annotated, budget, pool)] = True
            reporter.start(slides=len(regions.slides))
            reporter.add_patches(len(patches_of(regions, needed)))
            try:
                features = region_features_from_encoder(encoder, store, regions, dev, batch_size, workers,
                                                        needed=needed, progress=reporter.patches_done)
            finally:
                reporter.stop()

        ranked, scores = select_regions(strategy, None if features is None else features.to(dev), budget,
                                        is_annotated, entropy=entropy, pool=pool, seed=seed)
        legend = f"{strategy}, {budget} regions of {region_size}x{region_size} patches; box number = rank"
        files = write_outputs(out, regions, ranked, scores, store, legend=legend)
    finally:
        store.close()
    rows = [{"slide": regions.slides[regions.slide[r]].file_name, "rank": rank, "x": int(regions.x[r]),
             "y": int(regions.y[r]), "width": int(regions.width[r]), "height": int(regions.height[r]),
             "score": None if math.isnan(s) else round(float(s), 6)}
            for rank, (r, s) in enumerate(zip(ranked[:SUMMARY_ROWS], scores[:SUMMARY_ROWS]), start=1)]
    return {"out": os.path.abspath(out), "strategy": strategy, "budget": budget, "region_size": region_size,
            "slides": len(regions.slides), "regions": len(regions), "regions_candidate": candidates,
            "regions_annotated": int(is_annotated.sum()), "selected": rows, "files": files,
            "seconds": round(time.perf_counter() - started, 3)}


def _check_options(encoder, out, budget, region_size, strategy, features_dir, model, annotated, batch_size,
                   workers) -> None:
    if strategy not in STRATEGIES:
        raise SimclrPathError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if budget < 1:
        raise SimclrPathError(f"--budget must be at least 1 region, got {budget}")
    if region_size < 1:
        raise SimclrPathError(f"--region-size must be at least 1 patch, got {region_size}")
    check_loader_options(batch_size, workers)
    if strategy in NEEDS_ENTROPY and not model:
        raise SimclrPathError(f"--strategy {strategy} needs --model RUN (a 'simclr-path segment' run folder); "
                              "without one use --strategy kcenter")
    if model and strategy not in NEEDS_ENTROPY:
        raise SimclrPathError(f"--model is used by --strategy entropy or hybrid only, not {strategy}; drop --model "
                              "or choose --strategy hybrid")
    if features_dir and strategy not in NEEDS_FEATURES:
        raise SimclrPathError(f"--features is used by --strategy kcenter or hybrid only, not {strategy}; "
                              "drop --features")
    if not os.path.isfile(encoder):
        raise SimclrPathError(f"{encoder}: no such encoder file; export one with 'simclr-path export'")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SimclrPathError(f"{out}: is a file; give --out a folder")
    if annotated and os.path.isdir(out) and os.path.isdir(annotated) and os.path.samefile(out, annotated):
        raise SimclrPathError(f"{out}: is also the --annotated folder; the proposals would overwrite annotations - "
                              "choose another --out")
