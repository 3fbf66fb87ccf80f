"""The SimCLR pretraining loop, read top to bottom: ``train_one_epoch``, ``evaluate``, ``pretrain``.

``pretrain`` is the main function: :func:`build_run` sets everything up (data, model, optimiser,
schedule), :func:`resume` restores a checkpoint into it, the loop calls :func:`train_one_epoch`
until the schedule or ``max_steps`` ends, and :func:`summarize` makes the JSON summary.

Run folder::

    runs/NAME/config.yaml        resolved config
    runs/NAME/checkpoint.pt      latest checkpoint (atomic); rerunning the same command resumes
    runs/NAME/metrics.jsonl      one JSON object per logged step
    runs/NAME/curves.png         loss and learning rate at the end
    runs/NAME/tensorboard/       with --tensorboard
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch

from simclr_path.data.datasets import PatchDataset, TwoViewDataset
from simclr_path.data.device_views import DeviceViews, resolve_augment
from simclr_path.data.loader import RunSampler, build_loader, choose_prefetch, run_batches
from simclr_path.data.input_spec import to_model_input
from simclr_path.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from simclr_path.engine.config import PretrainConfig, changed_settings, save_config, upgrade_config_dict
from simclr_path.engine.gradients import cached_loss_and_backward, choose_chunk, loss_and_backward
from simclr_path.engine.metrics import TrainingLog
from simclr_path.engine.state import (
    StopOnSigterm,
    TrainState,
    checkpoint_contents,
    restore_checkpoint,
    rng_state,
    seed_this_rank,
)
from simclr_path.errors import SimclrPathError, StoppedBySignal
from simclr_path.losses import NTXentLoss
from simclr_path.models import SimCLRModel, check_backbone_name
from simclr_path.optim import build_optimizer, build_scheduler, scaled_lr
from simclr_path.runtime import distributed
from simclr_path.runtime.console import log
from simclr_path.runtime.device import native_bf16, precision_name, resolve_device
from simclr_path.runtime.files import locked_run_folder
from simclr_path.store.format import jsonable
from simclr_path.store.reader import PatchStore


@dataclass
class Run:
    """Everything a pretraining run is made of, built once by :func:`build_run`."""

    cfg: PretrainConfig
    out: str
    stores: list[str]
    store: PatchStore
    device: torch.device
    world: int
    per_rank_batch: int
    dataset: TwoViewDataset | PatchDataset  # PatchDataset: views made on the device (run.augment)
    model: torch.nn.Module  # the SimCLR model itself (what is checkpointed and exported)
    train_model: torch.nn.Module  # what the loop calls: DDP and/or torch.compile around ``model``
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: NTXentLoss
    lr: float
    chunk: int | None
    steps_per_epoch: int
    total_steps: int
    last_step: int  # where this invocation stops: max_steps or the end of the schedule
    state: TrainState
    prefetch: int = 0  # loader batches in flight per worker that /dev/shm allows here (0: none fit)
    shm_error: Exception | None = None
    mean: torch.Tensor = None  # (1, 3, 1, 1) normalisation constants, made on the device once
    std: torch.Tensor = None
    unchecked_losses: list = field(default_factory=list)  # device losses of steps since the last sync
    stop: StopOnSigterm = field(default_factory=StopOnSigterm)  # SIGTERM seen by this process
    stop_agreed: bool = False  # the ranks agreed at a sync step that one of them saw SIGTERM
    device_views: DeviceViews | None = None  # run.augment == "device": makes both views of a batch
    scaler: object = None  # torch.amp.GradScaler under fp16 autocast

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype of this run, when mixed precision is asked for (``run.bf16``): bf16 where the
        device has it natively, fp16 (with a gradient scaler) on a CUDA GPU without it, else None (fp32)."""
        if not self.cfg.run.bf16:
            return None
        if native_bf16(self.device):
            return torch.bfloat16
        return torch.float16 if self.device.type == "cuda" else None

    @property
    def bf16(self) -> bool:
        return self.amp_dtype == torch.bfloat16

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.out, CHECKPOINT_NAME)

    def save_checkpoint(self) -> None:
        """Every rank hands in its RNG state; rank 0 writes the checkpoint (the model and optimiser
        are the same on every rank)."""
        rank_rng = distributed.all_gather(rng_state(self.device))
        if distributed.is_main():
            extra = {"store": {"paths": [os.path.abspath(p) for p in self.stores], **_store_meta(self.store)},
                     "total_steps": self.total_steps}
            if self.scaler is not None:  # fp16: the loss scale it has learnt (and its growth count)
                extra["scaler"] = self.scaler.state_dict()
            contents = checkpoint_contents(self.model, self.optimizer, self.scheduler, self.state,
                                           self.cfg.to_dict(), self.cfg.model.backbone, rank_rng, extra)
            save_checkpoint(contents, self.checkpoint_path)


def is_sync_step(run: Run, step: int) -> bool:
    """Steps after which the host waits for the device: losses are read (one all-reduce that also
    carries the SIGTERM flag), checked for NaN/inf and logged. Every checkpoint step is one, so no
    step with a non-finite loss is ever saved."""
    cfg = run.cfg
    return (step % cfg.run.log_every == 0 or step == 1 or step == run.last_step
            or step % cfg.run.checkpoint_every == 0)


def model_input(batch: torch.Tensor, run: Run, step: int = 0) -> torch.Tensor:
    """(2B, S, S, 3) uint8 views from the loader -> normalised float (2B, 3, S, S) on the device
    (:func:`~simclr_path.data.input_spec.to_model_input`, as every other command's input); or, with
    views made on the device, (B, P, P, 3) uint8 patches -> both views of each, drawn for ``step``."""
    if run.device_views is not None:
        return run.device_views(batch.to(run.device, non_blocking=True), step)
    return to_model_input(batch, run.mean, run.std, run.device, channels_last=run.cfg.model.channels_last,
                          layout="NHWC")


def read_losses(pending: list[torch.Tensor], stop_requested: bool, device) -> tuple[list[float], bool]:
    """The global-batch losses of ``pending`` steps and whether any rank asked to stop: one collective
    and one host sync for all of them."""
    flag = torch.tensor([float(stop_requested)], dtype=torch.float64, device=device)
    packed = torch.cat([torch.stack(pending).double(), flag]) if pending else flag
    values = distributed.all_sum(packed).tolist()
    world = distributed.world_size()
    return [v / world for v in values[:-1]], values[-1] > 0


def check_losses(run: Run, through_step: int) -> tuple[list[float], bool]:
    """Read the unchecked losses (the last one is step ``through_step``); raise on NaN/inf naming the
    first bad step. Returns the losses and whether the ranks agree to stop."""
    losses, stop = read_losses(run.unchecked_losses, run.stop.requested, run.device)
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        first = through_step - (len(losses) - 1 - bad[0])
        raise SimclrPathError(
            f"loss became {losses[bad[0]]} at step {first}; stopped without saving, the last good checkpoint is "
            f"kept - lower --lr or check the data, then rerun to resume"
        )
    return losses, stop


def train_one_epoch(run: Run, batches, log: TrainingLog, knn=None) -> None:
    """Train over the rest of this epoch (batches from the run-long iterator ``batches``), or until
    ``run.last_step`` optimiser steps are done, or until SIGTERM asks to stop."""
    cfg, state = run.cfg, run.state
    run.train_model.train()
    use_amp = run.amp_dtype
    since, images = time.perf_counter(), 0
    for batch in itertools.islice(batches, run.steps_per_epoch - state.batch_in_epoch):
        views = model_input(batch, run, state.step)
        run.optimizer.zero_grad(set_to_none=True)
        if run.chunk is not None and run.chunk < views.shape[0]:
            loss = cached_loss_and_backward(run.train_model, views, run.loss_fn, use_amp, run.chunk,
                                            shuffle_seed(cfg.run.seed, state.step), scaler=run.scaler)
        else:
            loss = loss_and_backward(run.train_model, views, run.loss_fn, use_amp, scaler=run.scaler)
        run.unchecked_losses.append(loss)
        images += views.shape[0] * run.world
        # One process acts on SIGTERM at the next step; ranks agree on it at the next sync step.
        sync = is_sync_step(run, state.step + 1) or (run.stop.requested and not distributed.is_distributed())
        if sync:  # before the optimiser step, so a non-finite loss is never applied and then saved
            losses, stop = check_losses(run, state.step + 1)
        state.consistent = False
        if run.scaler is not None:  # fp16: unscale, skip the step if a gradient overflowed, adapt the scale
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        state.step += 1
        state.batch_in_epoch += 1
        run.scheduler.step_update(num_updates=state.step)
        state.consistent = True

        if sync:
            run.unchecked_losses = []
            log.steps_done(state.step, state.epoch, losses, run.optimizer.param_groups[0]["lr"], images,
                           time.perf_counter() - since)
            since, images = time.perf_counter(), 0
        if knn is not None and (state.step % cfg.run.eval_every == 0 or state.step == run.last_step):
            log.knn(state.step, state.epoch, evaluate(run, knn))  # rank 0 only; no collective
        if sync and state.step % cfg.run.checkpoint_every == 0:  # checkpoint steps are always sync steps
            run.save_checkpoint()
        if state.step >= run.last_step:
            break
        if sync and stop:  # every rank stops at the same step when any one was asked to
            run.stop_agreed = True
            break


def settle_losses(run: Run, log: TrainingLog) -> None:
    """Check and log losses still unread (a loop that ended between sync steps) before a checkpoint
    is written. Every rank gets here at the same step with the same number pending."""
    if run.unchecked_losses:
        losses, _ = check_losses(run, run.state.step)
        run.unchecked_losses = []
        log.steps_done(run.state.step, run.state.epoch, losses, run.optimizer.param_groups[0]["lr"], 0, 1.0)


def shuffle_seed(seed: int, step: int) -> int:
    """The gradient cache's view shuffle for ``step``: new every step, the same on resume."""
    return (seed * 1_000_003 + step) % 2**63


def evaluate(run: Run, knn) -> float:
    """kNN accuracy of the backbone on the labelled check set (see :class:`~simclr_path.engine.knn.KnnMonitor`)."""
    return knn(run.model.backbone, run.device)


def pretrain(stores: list[str], out: str, cfg: PretrainConfig, progress: bool = True) -> dict:
    """Pretrain (or resume) a SimCLR model on ``stores``; returns the run summary.

    Runs in this process; when torch.distributed is initialised, as one rank of the group (see
    :mod:`simclr_path.engine.launch`).
    """
    with StopOnSigterm() as stop, contextlib.ExitStack() as folder:
        run = build_run(stores, out, cfg)
        run.stop = stop
        if distributed.is_main():  # one run per folder: a second would race on the checkpoint and the metrics
            _prepare_run_dir(out)
            folder.enter_context(locked_run_folder(out, "simclr-path pretrain"))
        resume(run, open_run_folder(out, cfg))
        main = distributed.is_main()
        if main:
            save_config(cfg, os.path.join(out, "config.yaml"))
            log(describe(run))
        knn = None
        if main and cfg.run.eval_labeled:
            from simclr_path.engine.knn import KnnMonitor

            knn = KnnMonitor(cfg.run.eval_labeled, cfg.input_size(), cfg.views.mean, cfg.views.std,
                             cfg.run.eval_max_per_class, cfg.run.seed)
        training_log = TrainingLog(out, run.state.step, run.last_step, cfg.run.log_every, write=main,
                                   progress=progress, tensorboard=cfg.run.tensorboard)
        started = training_log.started = time.perf_counter()
        try:
            with training_log:
                train(run, training_log, knn)
                settle_losses(run, training_log)
                run.save_checkpoint()
        except KeyboardInterrupt:
            # Ctrl-C between optimiser steps: keep the progress since the last checkpoint, if its losses are finite
            if run.state.consistent and not distributed.is_distributed() and _all_finite(run.unchecked_losses):
                run.save_checkpoint()
            raise
        # still under the handler: a SIGTERM once the last step is done (the end of the schedule or
        # --max-steps; scancel at the very end) finds a finished run, which prints its summary like any other
        if stopping(run) and run.state.step < run.last_step:
            raise StoppedBySignal(
                f"stopped on SIGTERM after step {run.state.step}; checkpoint saved to {run.checkpoint_path} - "
                "rerun the same command to resume"
            )
        summary = summarize(run, training_log, time.perf_counter() - started)
        training_log.plot()
    return summary


def agree_on_prefetch(run: Run) -> int | None:
    """The loader prefetch every rank uses: the smallest that fits on any rank's /dev/shm (measured in
    :func:`build_run`, before any loader started); when one rank has no room, all stop with its message."""
    if run.cfg.run.workers == 0:
        return None
    agreed = distributed.all_min(run.prefetch, run.device)
    if agreed == 0:
        raise run.shm_error or SimclrPathError(
            "/dev/shm is too small on another process of this run for the data loader; see its message, or lower "
            "--workers or --batch"
        )
    return agreed


def stopping(run: Run) -> bool:
    """Stop before the next step: the ranks agreed on it at a sync step, or (one process) SIGTERM came.

    A rank never stops on its own flag alone, or the others would wait for it in a collective.
    """
    return run.stop_agreed or (run.stop.requested and not distributed.is_distributed())


def train(run: Run, training_log: TrainingLog, knn=None) -> None:
    """Epoch after epoch until ``run.last_step``, the end of the schedule, or SIGTERM; one loader throughout."""
    cfg, state = run.cfg, run.state
    sampler = RunSampler(len(run.dataset), run.world, distributed.rank(), cfg.run.seed, run.per_rank_batch,
                         cfg.optim.epochs, state.epoch, state.batch_in_epoch)
    loader = build_loader(run.dataset, sampler, cfg.run.workers, run.device.type == "cuda", agree_on_prefetch(run))
    with run_batches(loader) as batches:
        while state.step < run.last_step and state.epoch < cfg.optim.epochs and not stopping(run):
            train_one_epoch(run, batches, training_log, knn)
            if state.batch_in_epoch >= run.steps_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def preflight(stores: list[str], cfg: PretrainConfig, world: int) -> PatchStore:
    """Every check that needs no training: config, backbone name, batch split, the stores."""
    cfg.validate()
    check_backbone_name(cfg.model.backbone)
    if cfg.optim.global_batch % world:
        raise SimclrPathError(
            f"--batch {cfg.optim.global_batch} does not divide over {world} processes; use a multiple of {world}"
        )
    store = PatchStore(stores, exclude_qc=cfg.run.exclude_qc)
    _check_data(store, cfg, stores)
    return store


def open_run_folder(out: str, cfg: PretrainConfig) -> dict | None:
    """Create (rank 0) and check the run folder; returns its checkpoint when there is one."""
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
    return ckpt


def build_run(stores: list[str], out: str, cfg: PretrainConfig) -> Run:
    """Data, model, optimiser and schedule of a fresh run (seeded; nothing restored yet)."""
    world, rank = distributed.world_size(), distributed.rank()
    store = preflight(stores, cfg, world)
    device = resolve_device(cfg.run.device)
    if device.type == "cuda" and world > 1:
        device = distributed.local_cuda_device()
    per_rank_batch = cfg.optim.global_batch // world

    cfg.run.augment = resolve_augment(cfg.run.augment, device.type)  # recorded resolved (config.yaml, checkpoint)
    on_device = cfg.run.augment == "device"

    prefetch, shm_error = 0, None
    try:  # measured before any loader of this run exists (see agree_on_prefetch)
        prefetch = choose_prefetch(per_rank_batch, cfg.views.image_size, cfg.run.workers,
                                   patch_side=store.patch_size if on_device else None) or 0
    except SimclrPathError as exc:
        shm_error = exc

    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    kept = store.kept()  # without --exclude-qc's patches
    dataset = PatchDataset(kept, seed=cfg.run.seed) if on_device else TwoViewDataset(kept, cfg.views, seed=cfg.run.seed)
    steps_per_epoch = RunSampler(len(dataset), world, rank, cfg.run.seed, per_rank_batch, cfg.optim.epochs).steps_per_epoch
    total_steps = steps_per_epoch * cfg.optim.epochs
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    lr = scaled_lr(cfg.optim.base_lr, cfg.optim.global_batch, cfg.optim.lr_scaling)

    model = SimCLRModel(cfg.model.backbone, cfg.model.pretrained, cfg.model.head_hidden, cfg.model.head_out,
                        cfg.model.head_layers)
    if world > 1 and device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct2d's activation
    model = model.to(device)
    seed_this_rank(cfg.run.seed, rank)  # after the model is built: its initial weights are the same everywhere
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    device_views = DeviceViews(cfg.views, cfg.run.seed, rank, cfg.model.channels_last).to(device) if on_device else None
    optimizer = build_optimizer(model, lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.trust_coeff,
                                cfg.optim.optimizer)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps)
    last_step = min(cfg.optim.max_steps if cfg.optim.max_steps is not None else total_steps, total_steps)
    run = Run(cfg=cfg, out=out, stores=stores, store=store, device=device, world=world,
               per_rank_batch=per_rank_batch, dataset=dataset, model=model, train_model=model,
               optimizer=optimizer, scheduler=scheduler, loss_fn=NTXentLoss(cfg.loss.temperature,
                                                                            gather_distributed=True),
               lr=lr, chunk=None, steps_per_epoch=steps_per_epoch, total_steps=total_steps, last_step=last_step,
               prefetch=prefetch, shm_error=shm_error,
               mean=torch.tensor(cfg.views.mean, device=device).view(1, 3, 1, 1),
               std=torch.tensor(cfg.views.std, device=device).view(1, 3, 1, 1),
               state=TrainState(), device_views=device_views)
    if run.amp_dtype == torch.float16:
        run.scaler = torch.amp.GradScaler(device.type)
    return run


def resume(run: Run, ckpt: dict | None) -> None:
    """Restore ``ckpt`` (if any) into ``run``, then choose the gradient-cache chunk and wrap the model."""
    cfg = run.cfg
    if ckpt is not None:
        saved = upgrade_config_dict(ckpt["config"], run.checkpoint_path, quiet=True)
        saved_batch = saved["optim"]["global_batch"]
        saved_exclude = saved.get("run", {}).get("exclude_qc", "pen,blur")  # older runs had the default
        if saved_exclude != cfg.run.exclude_qc:  # another set of patches: the data position means nothing
            raise SimclrPathError(
                f"{run.checkpoint_path}: this run was started with --exclude-qc {saved_exclude}, not "
                f"{cfg.run.exclude_qc}; resume with --exclude-qc {saved_exclude} or use a new --out"
            )
        if ckpt.get("total_steps", run.total_steps) != run.total_steps or saved_batch != cfg.optim.global_batch:
            store_change = _store_change(ckpt.get("store") or {}, run)
            if store_change:
                raise SimclrPathError(
                    f"{run.checkpoint_path}: the stores changed since this run started ({store_change}), and with "
                    f"them its schedule ({ckpt.get('total_steps')} steps); resume on the stores as they were, or "
                    "train on them as they are now in a new --out"
                )
            raise SimclrPathError(
                f"{run.checkpoint_path}: this run was started with --batch {saved_batch} and "
                f"{ckpt.get('total_steps')} scheduled steps ({saved['optim']['epochs']} epochs); resume "
                "with the same --batch and --epochs (only --max-steps may change; --config "
                f"{os.path.join(run.out, 'config.yaml')} holds them) or use a new --out"
            )
        check_resumed_settings(run, saved, ckpt["step"])
        run.state = restore_checkpoint(ckpt, run.model, run.optimizer, run.scheduler, distributed.rank(), run.world,
                                       run.device, cfg.run.seed)
        if run.scaler is not None and ckpt.get("scaler"):
            # fp16 goes on at the scale it had reached: a fresh 2**16 would overflow and skip steps
            # until it had fallen again (and never skipped steps differ from an uninterrupted run)
            run.scaler.load_state_dict(ckpt["scaler"])
    else:
        run.scheduler.step_update(num_updates=0)
    run.chunk = _resolve_chunk(cfg, run.model, run.device, 2 * run.per_rank_batch)
    run.train_model = _wrap_for_training(run.model, cfg, run.device, run.world)


def _store_change(saved_store: dict, run: Run) -> str:
    """How the run's stores differ from those its checkpoint was trained on ('' when they do not):
    patches then and now, and the store files when those changed too."""
    then = saved_store.get("patches")
    if then is None or then == len(run.store):
        return ""
    change = f"{then} patches then, {len(run.store)} now"
    paths = [os.path.abspath(p) for p in run.stores]
    if saved_store.get("paths") and saved_store["paths"] != paths:
        change += f"; stores then {', '.join(saved_store['paths'])}, now {', '.join(paths)}"
    return change


def check_resumed_settings(run: Run, saved: dict, step: int) -> None:
    """Refuse to resume with a training setting other than the checkpoint's (a silent mix of two runs),
    unless ``--allow-config-change``: then each change is noted and appended to config-changes.jsonl."""
    changes = changed_settings(saved, run.cfg.to_dict())
    if not changes:
        return
    name, old, new = changes[0]
    more = f" (and {len(changes) - 1} more setting(s))" if len(changes) > 1 else ""
    if not run.cfg.run.allow_config_change:
        raise SimclrPathError(
            f"{run.checkpoint_path}: this run was started with {name}={old!r}, not {new!r}{more}; resume with the "
            f"same settings (--config {os.path.join(run.out, 'config.yaml')} holds them), use a new --out, or pass "
            "--allow-config-change to continue with the new ones (recorded in config-changes.jsonl)"
        )
    if distributed.is_main():
        with open(os.path.join(run.out, "config-changes.jsonl"), "a") as fh:
            for name, old, new in changes:
                fh.write(json.dumps({"step": int(step), "key": name, "was": old, "now": new}) + "\n")
                log(f"note: {name} changed from {old!r} to {new!r} on resume (--allow-config-change)")


def describe(run: Run) -> str:
    """The one line logged at the start of a run."""
    cfg = run.cfg
    return (f"{cfg.model.backbone} on {run.world} x {run.device.type}, {len(run.dataset)} patches, global batch "
            f"{cfg.optim.global_batch} = {run.world} x {run.per_rank_batch}: "
            f"{run.loss_fn.negatives_per_anchor(cfg.optim.global_batch)} negatives per anchor, "
            f"{run.steps_per_epoch} steps/epoch, lr {run.lr:.4g}, {_precision_text(run)}, "
            f"views made {'on the ' + run.device.type + ' (--augment device)' if run.device_views else 'by ' + str(cfg.run.workers) + ' loader worker(s) (--augment cpu)'}"
            + (f", gradient cache in chunks of {run.chunk} views" if run.chunk else "")
            + (f", resuming at step {run.state.step}" if run.state.step else ""))


def summarize(run: Run, training_log: TrainingLog, seconds: float) -> dict:
    """The JSON summary ``pretrain`` prints."""
    cfg, state = run.cfg, run.state
    return {
        "run": os.path.abspath(run.out),
        "checkpoint": os.path.abspath(run.checkpoint_path),
        "backbone": cfg.model.backbone,
        "device": str(run.device),
        "bf16": run.bf16,
        "precision": precision_name(run.amp_dtype),
        "augment": cfg.run.augment,
        "world_size": run.world,
        "global_batch": cfg.optim.global_batch,
        "negatives_per_anchor": run.loss_fn.negatives_per_anchor(cfg.optim.global_batch),
        "step": state.step,
        "total_steps": run.total_steps,
        "epoch": state.epoch,
        "first_loss": training_log.first_loss,
        "last_loss": training_log.final_loss(),
        "seconds": round(seconds, 2),
        "img_per_s": round(training_log.steady_rate(seconds), 2),
        "startup_s": round(training_log.startup_seconds, 2),
    }


def _precision_text(run: Run) -> str:
    """The precision, as the first line says it: fp16 names the reason (no native bf16 on this GPU)."""
    dtype = run.amp_dtype
    if dtype == torch.float16:
        return (f"fp16 autocast with a gradient scaler ({torch.cuda.get_device_name(run.device)}, compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(run.device)))}, has no native bf16)")
    return "bf16 autocast" if dtype == torch.bfloat16 else "fp32"


def _all_finite(losses: list[torch.Tensor]) -> bool:
    return not losses or bool(torch.isfinite(torch.stack(losses)).all())


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
    kept = int(store.included().sum())
    if kept == 0:
        raise SimclrPathError(f"{names}: every patch is flagged {','.join(store.exclude_qc)} by tiling QC; "
                              "check the tiling preview, or pass --exclude-qc none")
    if cfg.views.image_size > store.patch_size:
        raise SimclrPathError(
            f"--image-size {cfg.views.image_size} is larger than the {store.patch_size} px patches in {names}; "
            f"use --image-size <= {store.patch_size} or re-tile with a larger --patch-size"
        )
    resolutions = store_resolutions(store)
    if len(set(resolutions.values())) > 1 and not cfg.run.mixed_mpp:
        listed = ", ".join(f"{path} {_resolution_text(r)}" for path, r in resolutions.items())
        raise SimclrPathError(
            f"stores of different resolutions in one run ({listed}); re-tile them at one --mpp, or pass --mixed-mpp "
            "if mixing is on purpose"
        )
    if cfg.optim.global_batch > kept:
        raise SimclrPathError(
            f"--batch {cfg.optim.global_batch} is larger than the {kept} patches in {names}; lower --batch"
        )


def _resolve_chunk(cfg: PretrainConfig, model, device, views_per_rank: int) -> int | None:
    """``--chunk``: None (whole batch at once), a number of views, or 'auto' (from free GPU memory).

    Every rank must embed the same number of chunks (each chunk's backward is a collective), so the
    ranks agree on the smallest proposal, rounded down to a divisor of the per-rank views (a ragged
    last chunk would also recompile under torch.compile).
    """
    chunk = cfg.run.grad_cache_chunk
    if chunk is None:
        return None
    proposed = choose_chunk(model, cfg.views.image_size, views_per_rank, device, cfg.run.bf16) if chunk == "auto" \
        else int(chunk)
    agreed = agree_on_chunk(views_per_rank if proposed is None else proposed, views_per_rank, device)
    if chunk != "auto" and agreed != int(chunk) and distributed.is_main():
        log(f"note: --chunk {chunk} rounded to {agreed or views_per_rank} views, a divisor of the "
            f"{views_per_rank} views per process")
    return agreed


def agree_on_chunk(proposed: int, views_per_rank: int, device) -> int | None:
    """The chunk every rank uses: the smallest ``proposed`` over ranks, rounded down to a divisor of
    ``views_per_rank``; None when that is the whole batch (no cache needed)."""
    smallest = max(1, min(distributed.all_min(int(proposed), device), views_per_rank))
    divisor = max(d for d in range(1, smallest + 1) if views_per_rank % d == 0)
    return None if divisor >= views_per_rank else divisor


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


def store_resolutions(store: PatchStore) -> dict[str, tuple[float | None, float | None]]:
    """(target mpp, target magnification) of each store path, as the store records them (None: not set)."""
    return {path: (_rounded(attrs.get("target_mpp")), _rounded(attrs.get("magnification")))
            for path, attrs in zip(store.paths, store.attrs)}


def _rounded(value) -> float | None:
    value = jsonable(value)
    return None if value is None else round(value, 6)


def _resolution_text(resolution: tuple[float | None, float | None]) -> str:
    mpp, magnification = resolution
    if mpp is None and magnification is None:
        return "(resolution not recorded)"
    return f"{mpp} um/px" if mpp is not None else f"{magnification}x"


def _store_meta(store: PatchStore) -> dict:
    """What the checkpoint (and so the exported encoder) records of the training data."""
    attrs = store.attrs[0]
    return {
        "patch_size": store.patch_size,
        "target_mpp": jsonable(attrs.get("target_mpp")),
        "magnification": jsonable(attrs.get("magnification")),
        "resolutions": [{"path": os.path.abspath(path), "target_mpp": mpp, "magnification": magnification}
                        for path, (mpp, magnification) in store_resolutions(store).items()],
        "patches": len(store),
        "exclude_qc": list(store.exclude_qc),
        "patches_used": int(store.included().sum()),
    }
