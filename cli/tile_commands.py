"""``tile``, ``info`` and ``coords``: building and inspecting patch stores."""

from __future__ import annotations

import os
import sys

import click

from simclr_path.cli.output import echo_json


@click.command(
    epilog="""\b
Examples:
  simclr-path tile slides/ --out patches.h5                  # 0.5 um/px, 256 px, 2 workers
  simclr-path tile a.svs b.ndpi --out p.h5 --magnification 20 --patch-size 224
  find /data -name '*.svs' | simclr-path tile - --out p.h5 --workers 8
  simclr-path tile slides/ --out p.h5 --slide-mpp 0.25       # slides lacking mpp metadata
  simclr-path tile slides/ --out p-$ID.h5 --shard $ID/16      # SLURM array task $ID of 16
  simclr-path tile slides/ --out p.h5 --preview prev/ --qc-report qc/   # check what QC flagged
"""
)
@click.argument("slides", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Patch store (.h5) to create or resume.")
@click.option("--mpp", type=float, default=None, help="Target microns per pixel [default: 0.5 unless --magnification].")
@click.option("--magnification", type=float, default=None, help="Target magnification instead of --mpp (e.g. 20).")
@click.option("--patch-size", type=int, default=256, show_default=True, help="Patch side in target pixels.")
@click.option("--stride", type=int, default=None, help="Step between patches in target pixels [default: patch size].")
@click.option("--overlap", type=int, default=None, help="Overlap between patches in target pixels (stride = size - overlap).")
@click.option("--min-tissue", type=float, default=0.5, show_default=True, help="Keep patches with at least this tissue fraction.")
@click.option("--codec", type=click.Choice(["jpeg", "raw"]), default="jpeg", show_default=True, help="Pixel codec of the store.")
@click.option("--jpeg-quality", type=int, default=90, show_default=True)
@click.option("--slide-mpp", type=float, default=None, help="Level-0 mpp for slides whose metadata has none.")
@click.option("--mpp-csv", type=click.Path(exists=True, dir_okay=False), default=None, help="CSV of slide,mpp overriding metadata.")
@click.option("--workers", type=int, default=2, show_default=True, help="Reader processes (0: read in this process).")
@click.option("--shard", default=None, help="K/N: take every N-th slide starting at K (0 <= K < N).")
@click.option("--preview", type=click.Path(file_okay=False), default=None, help="Folder for one PNG per slide: tissue and kept patches.")
@click.option("--qc", "qc", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Flag pen ink, blur and folds per patch (stored; pretrain/embed/select leave pen and blur out).")
@click.option("--qc-report", type=click.Path(file_okay=False), default=None,
              help="Folder for one JSON per slide: patches per QC reason, thresholds, flagged patches.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def tile(slides, out, mpp, magnification, patch_size, stride, overlap, min_tissue, codec, jpeg_quality,
         slide_mpp, mpp_csv, workers, shard, preview, qc, qc_report, quiet):
    """Cut tissue patches from whole-slide images into an HDF5 patch store.

    SLIDES are files, folders (searched recursively for anything OpenSlide opens) or '-' to read
    paths from stdin. Rerunning the same command resumes: complete slides are skipped by content
    fingerprint. Exit code 0 only when every slide is tiled (or already was).
    """
    from simclr_path.errors import SimclrPathError
    from simclr_path.runtime.console import Reporter
    from simclr_path.wsi.discover import find_slides, parse_shard, take_shard
    from simclr_path.wsi.grid import TileSpec
    from simclr_path.wsi.slide import load_mpp_table
    from simclr_path.wsi.tiler import tile_slides

    if stride is not None and overlap is not None:
        raise SimclrPathError("give --stride or --overlap, not both")
    if overlap is not None:
        if not 0 <= overlap < patch_size:
            raise SimclrPathError(f"--overlap must be in [0, patch size), got {overlap}")
        stride = patch_size - overlap
    if mpp is None and magnification is None:
        mpp = 0.5
    spec = TileSpec(target_mpp=mpp, magnification=magnification, patch_size=patch_size, stride=stride,
                    min_tissue=min_tissue, codec=codec, jpeg_quality=jpeg_quality, qc=qc == "on")
    paths = take_shard(find_slides(slides, sys.stdin), parse_shard(shard))
    table = load_mpp_table(mpp_csv) if mpp_csv else None
    result = tile_slides(paths, out, spec, workers=workers, fallback_mpp=slide_mpp, mpp_table=table,
                         preview_dir=preview, qc_report_dir=qc_report, reporter=Reporter(enabled=not quiet))
    echo_json(result.as_dict())
    if not result.ok:
        sys.exit(1)


@click.command(epilog="Example:\n\n  simclr-path info patches.h5 | jq .total_patches")
@click.argument("stores", nargs=-1, required=True)
def info(stores):
    """Print a JSON summary of one or more patch stores (patches, patch size, mpp, QC counts, per slide)."""
    from simclr_path.store import store_summary

    echo_json(store_summary(stores))


@click.command(epilog="Example:\n\n  simclr-path coords patches.h5 --out clam_coords/")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for <slide>.h5 files.")
def coords(stores, out):
    """Write per-slide coords-only h5 files that CLAM's and TRIDENT's extractors read."""
    from simclr_path.store.coords_files import write_coords_files

    written = write_coords_files(list(stores), out)
    echo_json({"out": os.path.abspath(out), "files": len(written)})


COMMANDS = [tile, info, coords]
