"""``views``: looking at the data pretraining will see."""

from __future__ import annotations

import click

from simclr_path.cli.options import view_options
from simclr_path.cli.output import echo_json


@click.command(
    epilog="""\b
Examples:
  simclr-path views patches.h5 --out views.png --config small
  simclr-path views p-0.h5 p-1.h5 -o views.png --config resnet50_paper --n 8 --epoch 3
  simclr-path views patches.h5 -o weaker.png --config small --crop-scale 0.4 1 --color-jitter 0.4 0.4 0.4 0.02
  simclr-path views patches.h5 -o device.png --config small --augment device
"""
)
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(), help="PNG to write (replaced whole, atomically).")
@click.option("--n", "-n", "n", type=int, default=16, show_default=True, help="Patches to show.")
@click.option("--config", "config", default=None, help="Preset name in configs/ (small, resnet50_paper) or a YAML path.")
@click.option("--seed", type=int, default=None, help="Run seed [default: the config's].")
@click.option("--epoch", type=int, default=0, show_default=True, help="Epoch whose views to draw.")
@click.option("--augment", type=click.Choice(["cpu", "device"]), default=None,
              help="Pipeline that draws the views: cpu (albumentations, the reference) or device (the batched "
                   "pipeline of --augment device, run on the CPU here) [default: the config's, auto: what pretrain "
                   "on this machine uses].")
@view_options
def views(stores, out, n, config, seed, epoch, augment, **view_values):
    """Draw N patches and the two augmented views pretraining makes of each, as one PNG.

    The views are the very pixels `pretrain` with the same config, seed and epoch feeds the
    network; a label under each lists the transforms that fired, a legend the config.
    """
    import os

    import torch

    from simclr_path.cli.options import apply_view_options
    from simclr_path.data.device_views import resolve_augment
    from simclr_path.data.view_grid import write_view_grid
    from simclr_path.engine.config import load_config
    from simclr_path.errors import SimclrPathError
    from simclr_path.store import PatchStore

    if epoch < 0:
        raise SimclrPathError(f"--epoch must be >= 0, got {epoch}")
    cfg = apply_view_options(load_config(config), **view_values)
    seed = cfg.run.seed if seed is None else seed
    augment = augment or resolve_augment(cfg.run.augment, "cuda" if torch.cuda.is_available() else "cpu")
    indices = write_view_grid(out, PatchStore(list(stores)), cfg.views, n=n, seed=seed, epoch=epoch, augment=augment)
    echo_json({"out": os.path.abspath(out), "patches": len(indices), "image_size": cfg.views.image_size,
                "seed": seed, "epoch": epoch, "augment": augment, "indices": indices})


COMMANDS = [views]
