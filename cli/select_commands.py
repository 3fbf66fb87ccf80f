"""``select``: which regions a pathologist should annotate next (active learning)."""

from __future__ import annotations

import click

from simclr_path.cli.options import exclude_qc_option
from simclr_path.cli.output import echo_json


@click.command(epilog="""\b
Examples:
  simclr-path select encoder.pt patches.h5 --budget 20 --out round1/          # k-center, cold start
  simclr-path select encoder.pt patches.h5 --budget 20 --out round2/ --annotated qupath_export/
  simclr-path select encoder.pt patches.h5 --budget 20 --out round3/ --strategy hybrid \\
      --model runs/seg1 --annotated qupath_export/
  simclr-path select encoder.pt patches.h5 --budget 50 --out r/ --features features/ --region-size 1
  -> r/<slide>.geojson (open in QuPath), r/<slide>.png (regions drawn, numbered by rank), r/regions.csv
""")
@click.argument("encoder", type=click.Path(dir_okay=False))
@click.argument("stores", nargs=-1, required=True)
@click.option("--budget", type=int, required=True, help="Number of regions to propose.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--region-size", type=int, default=4, show_default=True,
              help="Region side in patches (K x K patches; 1: single patches).")
@click.option("--strategy", type=click.Choice(["random", "kcenter", "entropy", "hybrid"]), default="kcenter",
              show_default=True,
              help="kcenter: diverse regions by encoder features (no model needed); entropy: where a segment model "
                   "is least sure; hybrid: the most uncertain, then diverse among them; random.")
@click.option("--features", "features_dir", type=click.Path(file_okay=False), default=None,
              help="An 'embed' output folder of this encoder on these stores (instead of running the encoder).")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="A 'segment' run folder (for --strategy entropy/hybrid).")
@click.option("--annotated", type=click.Path(file_okay=False), default=None,
              help="Folder of <slide>.geojson (QuPath export) / <slide>.png masks already annotated: never proposed.")
@click.option("--mask-format", type=click.Choice(["auto", "index", "binary"]), default="auto", show_default=True,
              help="--annotated masks: index = class index per pixel, 255 unlabelled; binary = 0 background, any "
                   "other value labelled; auto = binary when the masks hold only 0 and 255.")
@click.option("--pool", type=int, default=None, help="hybrid: diversify among this many most uncertain regions "
                                                     "[default: 4 x budget].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --strategy random.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch", type=int, default=128, show_default=True,
              help="Patches per forward pass (the segment model takes at most 32).")
@click.option("--workers", type=int, default=2, show_default=True)
@exclude_qc_option()
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def select(encoder, stores, budget, out, region_size, strategy, features_dir, model, annotated, mask_format, pool, seed,
           device, batch, workers, exclude_qc, quiet):
    """Rank regions of the stored slides for annotation; write what a pathologist opens.

    A region is a square of K x K tissue patches; its feature is the mean of its patches' encoder
    features. Regions already annotated (--annotated) are never proposed. Writes
    OUT/<slide>.geojson (QuPath opens it: rectangles in level-0 pixels, class "Annotate next", name
    "rank N"), OUT/<slide>.thumbnail.png (a thumbnail with the regions numbered) and OUT/regions.csv
    (slide,rank,x,y,width,height,score over all slides, level-0 pixels).
    """
    from simclr_path.runtime.console import Reporter
    from simclr_path.selection.select import select_regions_for_annotation

    echo_json(select_regions_for_annotation(
        encoder, list(stores), out, budget=budget, region_size=region_size, strategy=strategy,
        features_dir=features_dir, model=model, annotated=annotated, pool=pool, seed=seed, device=device,
        batch_size=batch, workers=workers, exclude_qc=exclude_qc, reporter=Reporter(enabled=not quiet),
        mask_format=mask_format))


COMMANDS = [select]
