"""``segment-eval`` and ``predict``: using a trained segment run."""

from __future__ import annotations

import click

from simclr_path.cli.output import echo_json
from simclr_path.errors import SimclrPathError


@click.command("segment-eval", epilog="""\b
Examples:
  simclr-path segment-eval runs/seg held_out.h5 --labels held_out_labels/
  simclr-path segment-eval runs/seg --images tiles/ --masks masks/ --mpp 0.5 --overlay overlays/
  masks/<image stem>.png: the image's size; class index per pixel with 255 = not scored, or 0/255 binary
""")
@click.argument("run", type=click.Path(exists=True))
@click.argument("stores", nargs=-1)
@click.option("--labels", "labels_dir", type=click.Path(file_okay=False),
              help="Labels of the STORES: <slide>.png masks or QuPath <slide>.geojson (as for 'segment').")
@click.option("--images", "images_dir", type=click.Path(file_okay=False),
              help="Folder of images (png/jpg/tif/bmp) to score instead of stores; needs --masks.")
@click.option("--masks", "masks_dir", type=click.Path(file_okay=False),
              help="Folder with one <image stem>.png mask per image of --images.")
@click.option("--mpp", type=float, default=None,
              help="Microns per pixel of the --images [default: the training patches' resolution].")
@click.option("--mask-format", type=click.Choice(["auto", "index", "binary"]), default="auto", show_default=True,
              help="Mask values: index = class index per pixel, 255 not scored; binary = 0 background, any other "
                   "value class 1 (GlaS 0/255); auto = binary when the masks hold only 0 and 255.")
@click.option("--overlay", "overlay_dir", type=click.Path(file_okay=False),
              help="Write <name>.png per image: true outlines green, predicted magenta.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch", type=int, default=8, show_default=True, help="Windows or patches per forward pass.")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def segment_eval(run, stores, labels_dir, images_dir, masks_dir, mpp, mask_format, overlay_dir, device, batch, workers,
                 quiet):
    """Dice and IoU per class of a segment RUN on held-out labelled STORES or on images with masks.

    Prints one JSON line: scores pooled over all pixels ("overall"), per image (per slide for
    stores) and their mean over images; "mean_dice" is over the foreground classes (background
    beside it). On stores, each slide pixel is scored once, however much the patches overlap.
    """
    from simclr_path.runtime.console import Reporter
    from simclr_path.segment.evaluate import evaluate_segmentation

    if bool(images_dir) != bool(masks_dir):
        raise SimclrPathError("--images and --masks go together: give both folders")
    if images_dir and (stores or labels_dir):
        raise SimclrPathError("score either --images/--masks or STORES with --labels, not both")
    if not images_dir and not (stores and labels_dir):
        raise SimclrPathError("give STORES with --labels DIR, or --images DIR with --masks DIR")
    if mpp is not None and not images_dir:
        raise SimclrPathError("--mpp is the resolution of --images; stores know their own")
    echo_json(evaluate_segmentation(run, images_dir=images_dir, masks_dir=masks_dir, mpp=mpp,
                                     stores=list(stores) or None, labels_dir=labels_dir, device=device,
                                     overlay_dir=overlay_dir, batch_size=batch, workers=workers,
                                     reporter=Reporter(enabled=not quiet), mask_format=mask_format))


@click.command("predict", epilog="""\b
Example:
  simclr-path predict runs/seg patches.h5 --out predictions/ --downsample 16
  -> predictions/<slide>.png (class per pixel, 255 = not tiled), predictions/<slide>.geojson (QuPath)
""")
@click.argument("run", type=click.Path(exists=True))
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--downsample", type=float, default=None,
              help="Level-0 pixels per output pixel [default: the store's own resolution].")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def predict(run, stores, out, downsample, device, batch, workers, quiet):
    """Segment every slide of STORES with RUN: a class mask PNG and QuPath GeoJSON per slide.

    Classes other than class 0 (background) become annotation polygons in level-0 pixels, so
    QuPath opens them on the slide (File > Import objects).
    """
    from simclr_path.runtime.console import Reporter
    from simclr_path.segment.predict import predict_slides

    echo_json(predict_slides(run, list(stores), out, downsample=downsample, device=device, batch_size=batch,
                              workers=workers, reporter=Reporter(enabled=not quiet)))


COMMANDS = [segment_eval, predict]
