"""The SimCLR pretraining loop: ``train_one_epoch`` and ``pretrain``, read top to bottom.

Run folder::

    runs/NAME/config.yaml        resolved config
    runs/NAME/checkpoint.pt      latest checkpoint (atomic); rerunning the same command resumes
    runs/NAME/metrics.jsonl      one JSON object per logged step
    runs/NAME/curves.png         loss and learning rate at the end
    runs/NAME/tensorboard/       with --tensorboard
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass

import torch

from simclr_path.runtime import distributed
from simclr_path.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, strip_prefixes
from simclr_path.config import PretrainConfig, save_config
from simclr_path.errors import SimclrPathError, StoppedBySignal
from simclr_path.data.loader import ResumableSampler, build_loader
from simclr_path.losses import NTXentLoss
from simclr_path.models import SimCLRModel, check_backbone_name
from simclr_path.optim import build_optimizer, build_scheduler, scaled_lr
from simclr_path.runtime.console import log, stderr_console
from simclr_path.runtime.device import resolve_device
from simclr_path.step import cached_loss_and_backward, choose_chunk, loss_and_backward
from simclr_path.store.format import jsonable
from simclr_path.store.reader import PatchStore
from simclr_path.data.datasets import TwoViewDataset
from simclr_path.data.normalize import normalize


@dataclass
class TrainState:
    """Where the run is: completed optimiser steps and the data position of the next batch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    consistent: bool = True  # False while an optimiser step is half-applied
    stop_requested: bool = False  # SIGTERM seen: finish this step, checkpoint, stop


class _SigtermToStop:
    """While active, SIGTERM asks the loop to stop after the current step instead of killing it."""

    def __init__(self, state: TrainState):
        self.state, self.previous = state, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.state.stop_requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _prepare_run_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise SimclrPathError(f"{out}: run folder cannot be written ({exc.strerror}); choose another --out") from None


def _check_data(store: PatchStore, cfg: PretrainConfig, stores: list[str]) -> None:
    names = ", ".join(stores)
    if len(store) == 0:
        raise SimclrPathError(f"{names}: the store holds no patches; tile slides with tissue first")
    if cfg.views.image_size > store.patch_size:
        raise SimclrPathError(
            f"--image-size {cfg.views.image_size} is larger than the {store.patch_size} px patches in {names}; "
            f"use --image-size <= {store.patch_size} or re-tile with a larger --patch-size"
        )
    if cfg.optim.batch > len(store):
        raise SimclrPathError(
            f"--batch {cfg.optim.batch} is larger than the {len(store)} patches in {names}; lower --batch"
        )


def _checkpoint_state(model, optimizer, scheduler, state: TrainState, cfg: PretrainConfig, extra: dict) -> dict:
    return {
        "model": strip_prefixes(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        },
        "config": _plain(cfg.to_dict()),
        "backbone": cfg.model.backbone,
        **extra,
    }


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _restore(ckpt: dict, model, optimizer, scheduler) -> TrainState:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    random.setstate(_tuples(ckpt["rng"]["python"]))
    return TrainState(step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class MetricsLog:
    """metrics.jsonl in the run folder; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        kept = []
        if os.path.exists(path):
            with open(path) as fh:
                for line in fh:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            kept.append(line)
                    except (ValueError, KeyError):
                        pass
        self.records = [json.loads(line) for line in kept]
        with open(path, "w") as fh:
            fh.writelines(kept)

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def train_one_epoch(model, loss_fn, loader, optimizer, scheduler, state: TrainState, cfg: PretrainConfig, device,
                    stop_at: int, chunk: int | None, on_step) -> None:
    """Train over the rest of this epoch, or until ``stop_at`` optimiser steps are done."""
    model.train()
    use_amp = cfg.run.amp and device.type == "cuda"
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    for view0, view1 in loader:
        started = time.perf_counter()
        views = torch.cat([view0, view1]).to(device, non_blocking=True)
        views = normalize(views, cfg.views.mean, cfg.views.std).contiguous(memory_format=memory_format)
        optimizer.zero_grad(set_to_none=True)
        if chunk is not None and chunk < views.shape[0]:
            loss = cached_loss_and_backward(model, views, loss_fn, use_amp, chunk)
        else:
            loss = loss_and_backward(model, views, loss_fn, use_amp)
        value = distributed.all_mean(loss.item(), device)  # the global-batch loss, same on every rank
        if not math.isfinite(value):
            raise SimclrPathError(
                f"loss became {value} at step {state.step + 1}; stopped without saving, the last good "
                f"checkpoint is kept - lower --lr or check the data, then rerun to resume"
            )
        state.consistent = False
        optimizer.step()
        state.step += 1
        state.batch_in_epoch += 1
        scheduler.step_update(num_updates=state.step)
        state.consistent = True
        on_step(value, view0.shape[0] * 2 * distributed.world_size(), time.perf_counter() - started)
        if state.step >= stop_at:
            break
        # every rank stops at the same step when any one was asked to
        if distributed.all_mean(float(state.stop_requested), device) > 0:
            state.stop_requested = True
            break


def preflight(stores: list[str], cfg: PretrainConfig, world: int) -> PatchStore:
    """Every check that needs no training: config, backbone name, batch split, the stores."""
    cfg.validate()
    check_backbone_name(cfg.model.backbone)
    if cfg.optim.batch % world:
        raise SimclrPathError(
            f"--batch {cfg.optim.batch} does not divide over {world} processes; use a multiple of {world}"
        )
    store = PatchStore(stores)
    _check_data(store, cfg, stores)
    return store


def pretrain(stores: list[str], out: str, cfg: PretrainConfig, progress: bool = True) -> dict:
    """Pretrain (or resume) a SimCLR model on ``stores``; returns the run summary.

    Runs in this process; when torch.distributed is initialised, as one rank of the group (see
    :mod:`simclr_path.launch`).
    """
    world, rank = distributed.world_size(), distributed.rank()
    store = preflight(stores, cfg, world)
    device = resolve_device(cfg.run.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", distributed.local_rank())
    per_rank_batch = cfg.optim.batch // world
    if distributed.is_main():
        _prepare_run_dir(out)
    distributed.barrier()
    ckpt_path = os.path.join(out, CHECKPOINT_NAME)
    ckpt = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
    if ckpt is not None and ckpt["backbone"] != cfg.model.backbone:
        raise SimclrPathError(
            f"{ckpt_path}: holds a {ckpt['backbone']} checkpoint, not {cfg.model.backbone}; "
            f"use a new --out or --backbone {ckpt['backbone']}"
        )

    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    dataset = TwoViewDataset(store, cfg.views, seed=cfg.run.seed)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=cfg.run.seed)
    steps_per_epoch = len(sampler) // per_rank_batch
    total_steps = steps_per_epoch * cfg.optim.epochs
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    lr = scaled_lr(cfg.optim.base_lr, cfg.optim.batch, cfg.optim.lr_scaling)

    model = SimCLRModel(cfg.model.backbone, cfg.model.pretrained, cfg.model.head_hidden, cfg.model.head_out,
                        cfg.model.head_layers)
    if world > 1 and device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct2d's activation
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.trust_coeff)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps)
    state = TrainState()
    if ckpt is not None:
        saved_batch = ckpt["config"]["optim"]["batch"]
        if ckpt.get("total_steps", total_steps) != total_steps or saved_batch != cfg.optim.batch:
            raise SimclrPathError(
                f"{ckpt_path}: this run was started with --batch {saved_batch} and {ckpt.get('total_steps')} "
                f"scheduled steps ({ckpt['config']['optim']['epochs']} epochs); resume with the same --batch and "
                "--epochs (only --max-steps may change) or use a new --out"
            )
        state = _restore(ckpt, model, optimizer, scheduler)
    else:
        scheduler.step_update(num_updates=0)
    chunk = _resolve_chunk(cfg, model, device, 2 * per_rank_batch)
    train_model = _wrap_for_training(model, cfg, device, world)
    loss_fn = NTXentLoss(cfg.optim.temperature, gather_distributed=True)

    main = distributed.is_main()
    if main:
        save_config(cfg, os.path.join(out, "config.yaml"))
        log(f"{cfg.model.backbone} on {world} x {device.type}, {len(store)} patches, global batch {cfg.optim.batch} "
            f"= {world} x {per_rank_batch}: {loss_fn.negatives_per_anchor(cfg.optim.batch)} negatives per anchor, "
            f"{steps_per_epoch} steps/epoch, lr {lr:.4g}"
            + (f", gradient cache in chunks of {chunk} views" if chunk else "")
            + (f", resuming at step {state.step}" if state.step else ""))
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), state.step) if main else None
    knn = None
    if main and cfg.run.eval_labeled:
        from simclr_path.evaluate import KnnMonitor

        knn = KnnMonitor(cfg.run.eval_labeled, cfg.views.image_size, cfg.views.mean, cfg.views.std,
                         cfg.run.eval_max_per_class, cfg.run.seed)
    writer = _tensorboard(out) if main and cfg.run.tensorboard else None
    last_stop = cfg.optim.max_steps if cfg.optim.max_steps is not None else total_steps
    last_stop = min(last_stop, total_steps)
    extra = {"store": {"paths": [os.path.abspath(p) for p in stores], **_store_meta(store)},
             "total_steps": total_steps}

    def save():
        if main:
            save_checkpoint(_checkpoint_state(model, optimizer, scheduler, state, cfg, extra), ckpt_path)

    started = time.perf_counter()
    images_seen = 0
    logged_losses = [r["loss"] for r in metrics.records if "loss" in r] if metrics else []
    first_loss = logged_losses[0] if logged_losses else None
    last_loss = None
    bar = _progress(progress and main, last_stop, state.step)

    def on_step(loss_value: float, images: int, seconds: float):
        nonlocal images_seen, first_loss, last_loss
        images_seen += images
        last_loss = loss_value
        if first_loss is None:
            first_loss = loss_value
        lr_now = optimizer.param_groups[0]["lr"]
        rate = images / max(seconds, 1e-9)
        if bar is not None:
            bar.update(bar_task, advance=1, loss=f"{loss_value:.4f}", lr=f"{lr_now:.3g}", rate=f"{rate:,.0f} img/s",
                       epoch=state.epoch)
        if main and (state.step % cfg.run.log_every == 0 or state.step == 1 or state.step == last_stop):
            record = {"step": state.step, "epoch": state.epoch, "loss": loss_value, "lr": lr_now,
                      "img_per_s": round(rate, 2)}
            metrics.write(record)
            if writer is not None:
                writer.add_scalar("loss", loss_value, state.step)
                writer.add_scalar("lr", lr_now, state.step)
        if knn is not None and (state.step % cfg.run.eval_every == 0 or state.step == last_stop):
            accuracy = knn(model.backbone, device)
            metrics.write({"step": state.step, "epoch": state.epoch, "knn_acc": round(accuracy, 4)})
            if writer is not None:
                writer.add_scalar("knn_acc", accuracy, state.step)
            (bar.console.print if bar is not None else log)(f"step {state.step}: kNN accuracy {accuracy:.3f}")
        if state.step % cfg.run.checkpoint_every == 0:
            save()

    bar_task = bar.add_task("pretrain", total=last_stop, completed=state.step, loss="", lr="", rate="",
                            epoch=state.epoch) if bar is not None else None
    try:
        if bar is not None:
            bar.start()
        with _SigtermToStop(state):
            while state.step < last_stop and state.epoch < cfg.optim.epochs and not state.stop_requested:
                sampler.set_epoch(state.epoch, start_index=state.batch_in_epoch * per_rank_batch)
                dataset.set_epoch(state.epoch)
                loader = build_loader(dataset, sampler, per_rank_batch, cfg.run.workers, device.type == "cuda")
                train_one_epoch(train_model, loss_fn, loader, optimizer, scheduler, state, cfg, device, last_stop,
                                chunk, on_step)
                if state.batch_in_epoch >= steps_per_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        save()
        if state.stop_requested:
            raise StoppedBySignal(
                f"stopped on SIGTERM after step {state.step}; checkpoint saved to {ckpt_path} - "
                "rerun the same command to resume"
            )
    except KeyboardInterrupt:
        if state.consistent and not distributed.is_distributed():
            save()  # Ctrl-C between optimiser steps: keep the progress since the last checkpoint
        raise
    finally:
        if bar is not None:
            bar.stop()
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - started
    summary = {
        "run": os.path.abspath(out),
        "checkpoint": os.path.abspath(ckpt_path),
        "backbone": cfg.model.backbone,
        "device": str(device),
        "world_size": world,
        "global_batch": cfg.optim.batch,
        "negatives_per_anchor": loss_fn.negatives_per_anchor(cfg.optim.batch),
        "step": state.step,
        "total_steps": total_steps,
        "epoch": state.epoch,
        "first_loss": first_loss,
        "last_loss": last_loss if last_loss is not None else (logged_losses[-1] if logged_losses else None),
        "seconds": round(seconds, 2),
        "img_per_s": round(images_seen / seconds, 2) if seconds > 0 else 0.0,
    }
    if main:
        from simclr_path.plots import plot_curves

        plot_curves(metrics.records, os.path.join(out, "curves.png"))
    return summary


def _resolve_chunk(cfg: PretrainConfig, model, device, views_per_rank: int) -> int | None:
    """``--chunk``: None (whole batch at once), a number of views, or 'auto' (from free GPU memory)."""
    chunk = cfg.run.chunk
    if chunk is None:
        return None
    if chunk == "auto":
        return choose_chunk(model, cfg.views.image_size, views_per_rank, device, cfg.run.amp)
    return int(chunk)


def _wrap_for_training(model, cfg: PretrainConfig, device, world: int):
    """DDP when distributed (batch norm already synchronised on CUDA), then torch.compile if asked."""
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            model = DistributedDataParallel(model, device_ids=[device.index])
        else:
            if distributed.is_main():
                log("note: SyncBatchNorm needs CUDA; on CPU each process normalises over its own batch")
            model = DistributedDataParallel(model)
    if cfg.model.compile:
        model = torch.compile(model)
    return model


def _store_meta(store: PatchStore) -> dict:
    attrs = store.attrs[0]
    return {
        "patch_size": store.patch_size,
        "target_mpp": jsonable(attrs.get("target_mpp")),
        "magnification": jsonable(attrs.get("magnification")),
        "patches": len(store),
    }


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SimclrPathError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(os.path.join(out, "tensorboard"))


def _progress(enabled: bool, total: int, done: int):
    if not enabled or not stderr_console().is_terminal:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]}"),
        TimeRemainingColumn(),
        console=stderr_console(),
    )
