"""``pretrain``, ``export`` and ``demo``."""

from __future__ import annotations

import click

from simclr_path.cli.options import apply_view_options, exclude_qc_option, view_options
from simclr_path.cli.output import echo_json


@click.command(
    epilog="""\b
Examples:
  simclr-path pretrain patches.h5 --out runs/small --config small
  simclr-path pretrain p-0.h5 p-1.h5 --out runs/r50 --config resnet50_paper --batch 512 --epochs 50
  simclr-path pretrain patches.h5 --out runs/small     # again: resumes from runs/small/checkpoint.pt
  simclr-path pretrain patches.h5 --out runs/r50 --config resnet50_paper --gpus 8 --batch 4096
  simclr-path pretrain patches.h5 --out runs/r50 --config resnet50_paper --gpus 1 --batch 4096 --chunk auto
  simclr-path pretrain patches.h5 --out runs/cpu --config small --device cpu --nproc 2
"""
)
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run folder (created; resumed if it holds a checkpoint).")
@click.option("--config", "config", default=None, help="Preset name in configs/ (small, resnet50_paper) or a YAML path.")
@click.option("--batch", type=int, default=None, help="Global batch size (patches; two views each).")
@click.option("--epochs", type=int, default=None)
@click.option("--lr", type=float, default=None,
              help="Base learning rate, scaled by the config's lr_scaling: linear x batch/256, or sqrt x sqrt(batch).")
@click.option("--temperature", type=float, default=None, help="NT-Xent temperature.")
@click.option("--weight-decay", type=float, default=None, help="Weight decay of the weights (biases and norms get none).")
@click.option("--warmup-epochs", type=float, default=None, help="Linear warm-up before the cosine decay, in epochs.")
@click.option("--optimizer", type=click.Choice(["lars", "sgd"]), default=None,
              help="LARS (SimCLR's; the presets) or momentum SGD, both without decay on biases and norms. "
                   "SGD takes --lr as given: set one for it (a LARS rate is far too high).")
@click.option("--input-scale", type=float, default=None,
              help="The exported encoder takes whole patches at --image-size x this, 0.25-4 (views are crops of "
                   "them) [default: the config's; small 1.5, else 1].")
@click.option("--backbone", default=None, help="timm model name, e.g. resnet50.")
@click.option("--pretrained", type=click.Path(dir_okay=False), default=None, help="Local weights file for the backbone.")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=None)
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps (the schedule still spans --epochs).")
@click.option("--checkpoint-every", type=int, default=None, help="Steps between checkpoints.")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model.")
@click.option("--bf16/--no-bf16", default=None,
              help="Mixed precision: bf16 autocast where native (CUDA compute capability >= 8, CPUs with AVX512-BF16 "
                   "or AMX), fp16 with a gradient scaler on older GPUs, fp32 on other CPUs [default: on].")
@click.option("--augment", type=click.Choice(["auto", "device", "cpu"]), default=None,
              help="Where the two views are made: device (the training GPU, whole batch at once; loader workers only "
                   "decode), cpu (albumentations in the loader workers) [default: auto: device on CUDA, else cpu].")
@click.option("--tensorboard", is_flag=True, default=None, help="Also log to runs/NAME/tensorboard.")
@click.option("--gpus", type=int, default=None, help="Train on N GPUs of this machine (N processes, NCCL).")
@click.option("--nproc", type=int, default=None, help="Processes on this machine; with --device cpu uses gloo.")
@click.option("--chunk", default=None, help="Gradient cache: views per chunk, or 'auto' (from free GPU memory).")
@click.option("--eval-labeled", default=None, help="Labelled patches (class folders, CSV, store) for a kNN check.")
@click.option("--eval-every", type=int, default=None, help="Steps between kNN checks [default: 500].")
@click.option("--mixed-mpp", is_flag=True, default=None, help="Allow stores of different resolutions in one run (all are recorded).")
@click.option("--allow-config-change", is_flag=True, default=None,
              help="Resume even though a training setting differs from the checkpoint's (recorded in the run folder).")
@exclude_qc_option(default=None)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@view_options
def pretrain(stores, out, config, batch, epochs, lr, temperature, weight_decay, warmup_epochs, optimizer, input_scale,
             backbone, pretrained, workers, device, seed, max_steps, checkpoint_every, compile_, bf16, augment,
             tensorboard, gpus, nproc, chunk, eval_labeled, eval_every, mixed_mpp, allow_config_change, exclude_qc, quiet,
             **views):
    """Pretrain a timm backbone with SimCLR on one or more patch stores.

    --batch is the global batch, split over processes. Under torchrun or srun the ranks come from
    the environment. Prints one JSON summary line on stdout; progress and logs go to stderr.
    """
    from simclr_path.engine.config import apply_overrides, load_config
    from simclr_path.engine.launch import run_pretrain
    from simclr_path.errors import SimclrPathError

    if gpus is not None and nproc is not None:
        raise SimclrPathError("give --gpus or --nproc, not both")
    if gpus is not None:
        if device not in (None, "auto", "cuda"):
            raise SimclrPathError(f"--gpus runs on CUDA; drop --device {device} or use --nproc")
        device = "cuda"
    if chunk is not None and chunk != "auto":
        try:
            chunk = int(chunk)
        except ValueError:
            raise SimclrPathError(f"--chunk must be a number of views or 'auto', got {chunk!r}") from None
    cfg = apply_overrides(load_config(config), batch=batch, epochs=epochs, lr=lr, temperature=temperature,
                          weight_decay=weight_decay, warmup_epochs=warmup_epochs, optimizer=optimizer,
                          input_scale=input_scale, mixed_mpp=mixed_mpp, allow_config_change=allow_config_change,
                          backbone=backbone, pretrained=pretrained, workers=workers, device=device, seed=seed,
                          max_steps=max_steps, checkpoint_every=checkpoint_every, compile=compile_, bf16=bf16, augment=augment,
                          tensorboard=tensorboard or None, chunk=chunk, eval_labeled=eval_labeled, eval_every=eval_every,
                          exclude_qc=exclude_qc)
    cfg = apply_view_options(cfg, **views)
    summary = run_pretrain(list(stores), out, cfg, nproc=gpus or nproc or 1, progress=not quiet)
    if summary is not None:  # rank 0 only
        echo_json(summary)


@click.command(
    epilog="""\b
Examples:
  simclr-path export runs/small encoder.pt
  simclr-path export runs/small/checkpoint.pt encoder.safetensors --format safetensors
Load it:
  timm.create_model("resnet18", num_classes=0, checkpoint_path="encoder.pt")
  simclr_path.load_encoder("encoder.pt")   # -> (model, metadata)
"""
)
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["torch", "safetensors"]), default=None,
              help="Default: from OUT's extension (.safetensors), else torch.")
def export(source, out, fmt):
    """Export the encoder (backbone weights + metadata) of a run folder or checkpoint."""
    import os

    from simclr_path.downstream.encoder import export_encoder

    meta = export_encoder(source, out, fmt)
    training = meta["training"]
    echo_json({"encoder": os.path.abspath(out), "timm_model": meta["timm_model"], "input_size": meta["input_size"],
                "patch_mpp": meta["patch_mpp"], "steps": training["steps"], "total_steps": training["total_steps"],
                "finished": training["steps"] >= training["total_steps"]})


@click.command(epilog="Example:\n\n  simclr-path demo --out simclr-path-demo")
@click.option("--out", "-o", default="simclr-path-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--steps", type=int, default=40, show_default=True, help="Pretraining steps.")
@click.option("--quiet", "-q", is_flag=True)
def demo(out, steps, quiet):
    """Run the whole chain on a built-in synthetic slide (CPU, a few minutes, no input)."""
    from simclr_path.demo import run_demo

    echo_json(run_demo(out, steps=steps, progress=not quiet))


COMMANDS = [pretrain, export, demo]
