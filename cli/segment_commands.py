"""``segment``: a segmentation network from the exported encoder, a few labels and the unlabelled rest."""

from __future__ import annotations

import click

from simclr_path.cli.output import echo_json


@click.command(
    epilog="""\b
Examples:
  simclr-path tile glas/images --out glas.h5 --slide-mpp 0.62 --mpp 1.24 --patch-size 128 --min-tissue 0
  simclr-path segment encoder.pt glas.h5 --labels masks/ --out runs/seg --ssl fixmatch
  simclr-path segment encoder.pt slides.h5 --labels qupath/ --classes background,gland --out runs/seg
  simclr-path segment encoder.pt slides.h5 --labels qupath/ --out runs/seg   # again: resumes
  simclr-path segment timm:resnet18 glas.h5 --labels masks/ --out runs/baseline   # random-init baseline
"""
)
@click.argument("encoder")
@click.argument("stores", nargs=-1, required=True)
@click.option("--labels", "labels_dir", required=True, type=click.Path(file_okay=False),
              help="Folder of <slide>.png masks (see --mask-format) or QuPath <slide>.geojson (with --classes).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run folder (created; resumed if it holds a checkpoint).")
@click.option("--classes", default=None, help="Class names, comma-separated, index = class value [masks: from the values].")
@click.option("--ssl", type=click.Choice(["none", "fixmatch"]), default="none", show_default=True,
              help="fixmatch: also learn from unlabelled patches (confident EMA-teacher pseudo-labels).")
@click.option("--threshold", type=float, default=0.95, show_default=True, help="FixMatch pseudo-label confidence.")
@click.option("--cutmix", type=float, default=0.5, show_default=True,
              help="FixMatch: probability of pasting a rectangle of another unlabelled patch into a strong view.")
@click.option("--unlabeled-ratio", type=float, default=1.0, show_default=True, help="Unlabelled per labelled patch in a step.")
@click.option("--ema", type=float, default=0.99, show_default=True, help="Decay of the teacher's moving average.")
@click.option("--rampup", type=float, default=0.2, show_default=True,
              help="Fraction of the schedule over which the unsupervised loss weight rises from 0 to 1.")
@click.option("--batch", type=int, default=8, show_default=True, help="Labelled patches per step.")
@click.option("--epochs", type=int, default=None,
              help="Passes over the labelled patches: the schedule [default: 30; 90 with --ssl fixmatch, whose "
                   "teacher needs the longer one].")
@click.option("--steps", type=int, default=None, help="The schedule in steps instead of --epochs (a fixed budget).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW learning rate of the decoder.")
@click.option("--encoder-lr-scale", type=float, default=None,
              help="Encoder lr = lr x this [default: 0.1 for our encoder, 1 for timm:<name>].")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--freeze-encoder-steps", type=int, default=0, show_default=True,
              help="Train the decoder alone for the first N steps (encoder weights and batch norm as given).")
@click.option("--recalibrate-bn", is_flag=True,
              help="Re-estimate the encoder's batch-norm statistics on the stores' patches before training "
                   "and hold them through it (pretraining recorded them on augmented views; a small batch's "
                   "own statistics are noisy).")
@click.option("--image-size", type=int, default=None,
              help="Network input side, a multiple of 32 [default: matched to the encoder's pretraining um/px].")
@click.option("--mask-downsample", type=float, default=None, help="Level-0 px per mask px [default: from the mask size].")
@click.option("--mask-format", type=click.Choice(["auto", "index", "binary"]), default="auto", show_default=True,
              help="Mask values: index = class index per pixel, 255 unlabelled; binary = 0 background, any other "
                   "value the foreground class (GlaS 0/255); auto = binary when the masks hold only 0 and 255.")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=int, default=100, show_default=True)
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def segment(encoder, stores, labels_dir, out, classes, ssl, threshold, cutmix, unlabeled_ratio, ema, rampup, batch,
            epochs, steps, max_steps, lr, encoder_lr_scale, weight_decay, freeze_encoder_steps, recalibrate_bn, image_size, mask_downsample, mask_format, device,
            workers,
            seed, checkpoint_every, log_every, quiet):
    """Train a Unet whose encoder is ENCODER (an exported encoder, or timm:<name> for random init)
    on the labelled areas of STORES, and with --ssl fixmatch on the unlabelled rest too.

    Writes config.yaml, metrics.jsonl, curves.png and checkpoint.pt into --out; prints one JSON line.
    """
    from simclr_path.errors import SimclrPathError
    from simclr_path.segment.config import SegmentConfig
    from simclr_path.segment.train import train_segmentation

    if epochs is not None and steps is not None:
        raise SimclrPathError("give --epochs or --steps, not both: each sets the length of the schedule")

    cfg = SegmentConfig(
        encoder=encoder, classes=classes.split(",") if classes else None, image_size=image_size, batch=batch,
        epochs=epochs, steps=steps, max_steps=max_steps, rampup=rampup, lr=lr,
        encoder_lr_scale=encoder_lr_scale, weight_decay=weight_decay, freeze_encoder_steps=freeze_encoder_steps,
        recalibrate_bn=recalibrate_bn,
        ssl=ssl, threshold=threshold, cutmix=cutmix, unlabeled_ratio=unlabeled_ratio, ema=ema,
        mask_downsample=mask_downsample, mask_format=mask_format,
        seed=seed, device=device, workers=workers, log_every=log_every, checkpoint_every=checkpoint_every,
    )
    echo_json(train_segmentation(list(stores), labels_dir, out, cfg, progress=not quiet))


COMMANDS = [segment]
