"""``simclr-path segment``: a Unet trained from a few labelled regions plus the unlabelled rest.

The supervised loss is cross-entropy on labelled pixels only (255 = unlabelled). With
``ssl="fixmatch"`` (Sohn et al. 2020, applied per pixel as in Lai et al. 2021): an EMA teacher
predicts the weak view of each unlabelled patch; where its softmax probability reaches
``threshold`` the argmax becomes the pseudo-label, and the student's prediction of the strong view
(same geometry, photometric changes, and with ``cutmix`` a rectangle pasted from another
unlabelled patch, its pseudo-labels moved with it) must match it. The strong views go through the
student in a pass of their own whose batch norm leaves the running statistics alone, so the
statistics inference uses are those of real images (batch norm layers in eval mode - a frozen or
held encoder's - normalise with their running statistics in that pass too). The unsupervised loss
is averaged over all unlabelled pixels, so unconfident pixels add nothing; its weight ramps from 0
to 1 over the first ``rampup`` of the schedule (the teacher starts as an untrained decoder).
Inference uses the teacher.

Run conventions follow ``pretrain``: ``config.yaml``, ``metrics.jsonl``, ``curves.png`` and an
atomic ``checkpoint.pt`` in the run folder; the same command resumes exactly (batches are a
function of (seed, step)); SIGTERM checkpoints and stops (exit 143; the loader workers ignore it, as
``pretrain``'s do), and so does Ctrl-C (exit 130); a second run into the same folder is refused (a
run holds its folder's lock); one JSON summary on stdout.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from simclr_path.data.input_spec import InputSpec
from simclr_path.data.loader import run_batches, worker_init
from simclr_path.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from simclr_path.runtime.files import file_sha256
from simclr_path.downstream.encoder import read_encoder
from simclr_path.engine.checkpoint import save_checkpoint
from simclr_path.engine.curves import plot_curves
from simclr_path.engine.metrics import MetricsLog
from simclr_path.engine.state import StopOnSigterm
from simclr_path.errors import SimclrPathError, StoppedBySignal
from simclr_path.optim.schedule import build_scheduler
from simclr_path.runtime.console import log, stderr_console
from simclr_path.runtime.device import native_bf16, resolve_device
from simclr_path.runtime.files import locked_run_folder
from simclr_path.segment.checkpoint import SEGMENT_CHECKPOINT, SEGMENT_KIND, read_segment_checkpoint
from simclr_path.segment.config import (FIXED_ON_RESUME, FIXMATCH_ONLY, RANDOM_INIT_PREFIX, SegmentConfig,
                                        default_epochs, save_segment_config)
from simclr_path.segment.data import SegmentationSamples, StepBatches, collate, cutmix_boxes, paste_neighbours
from simclr_path.segment.finetune import recalibrate_encoder_bn, set_encoder_mode
from simclr_path.segment.labels import IGNORE, LabelSet, load_labels
from simclr_path.segment.model import build_unet, check_image_size, matched_image_size, unet_from_encoder
from simclr_path.store import PatchStore


@dataclass
class SegmentRun:
    """Everything a segment run holds while it trains."""

    cfg: SegmentConfig
    out: str
    store: PatchStore
    labels: LabelSet
    labelled: np.ndarray
    unlabelled: np.ndarray
    meta: dict
    model: torch.nn.Module
    teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: torch.device
    total_steps: int
    schedule_steps: int
    bf16: bool = False  # bf16 autocast: native on the device (decided once, at build)
    step: int = 0
    saved_step: int = 0  # the step the checkpoint in ``out`` holds
    consistent: bool = True  # False while an optimiser step and the teacher's update are half-applied
    stop: StopOnSigterm | None = None
    records: list = field(default_factory=list)
    resume_from: dict | None = None  # the checkpoint ``out`` held at build, read once; dropped once loaded

    @property
    def spec(self) -> InputSpec:
        """The network input (side, mean, std), as inference reads it back from the run's metadata."""
        return InputSpec.from_meta(self.meta)

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.out, SEGMENT_CHECKPOINT)

    def save_checkpoint(self) -> None:
        save_checkpoint({
            "kind": SEGMENT_KIND,
            "model": self.model.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "config": self.cfg.as_dict(),
            "meta": self.meta,
        }, self.checkpoint_path)
        self.saved_step = self.step


def encoder_meta(cfg: SegmentConfig) -> dict:
    """timm name, mean/std and pretraining input resolution of the encoder (or of ``timm:<name>``)."""
    if cfg.random_init:
        name = cfg.encoder[len(RANDOM_INIT_PREFIX):]
        return {"timm_model": name, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input_mpp": None,
                "encoder_sha256": None}
    _, meta = read_encoder(cfg.encoder)
    return {"timm_model": meta["timm_model"], "mean": meta["mean"], "std": meta["std"],
            "input_mpp": meta.get("input_mpp"), "encoder_sha256": file_sha256(cfg.encoder)}


def store_mpp(store: PatchStore, stores: list[str]) -> float | None:
    """The stores' common patch resolution (um/px), None when unknown; different ones are refused."""
    values = set()
    for path, attrs in zip(stores, store.attrs):
        mpp = attrs.get("target_mpp")
        values.add(None if mpp is None or math.isnan(float(mpp)) else round(float(mpp), 6))
    if len(values) > 1:
        raise SimclrPathError(
            f"{', '.join(stores)}: stores of different resolutions ({sorted(map(str, values))} um/px); "
            "segment one resolution at a time"
        )
    return values.pop()


def build_segment_run(stores: list[str], labels_dir: str, out: str, cfg: SegmentConfig) -> SegmentRun:
    """Check everything, build the model and optimiser; nothing is trained or written yet."""
    cfg.validate()
    device = resolve_device(cfg.device)
    enc = encoder_meta(cfg)
    store = PatchStore(stores)
    if len(store) == 0:
        raise SimclrPathError(f"{', '.join(stores)}: the stores hold no patches")
    labels = load_labels(labels_dir, store, cfg.classes, cfg.mask_downsample, cfg.mask_format)
    cfg.classes = list(labels.classes)
    cfg.mask_format = labels.mask_format  # what "auto" read the masks as: a resume must read them alike
    patch_mpp = store_mpp(store, stores)
    if cfg.image_size is None:
        cfg.image_size = matched_image_size(store.patch_size, patch_mpp, enc["input_mpp"])
    check_image_size(cfg.image_size)
    labelled = labels.labelled_indices(store)
    if not len(labelled):
        raise SimclrPathError(
            f"{labels_dir}: no patch of the stores overlaps a labelled pixel; check that the labels are in the "
            "slides' level-0 pixels (or --mask-downsample) and cover tissue that was tiled"
        )
    unlabelled = np.setdiff1d(np.arange(len(store)), labelled)
    if cfg.ssl == "fixmatch" and not len(unlabelled):
        raise SimclrPathError("--ssl fixmatch: every patch is labelled, there is nothing unlabelled; use --ssl none")
    if cfg.encoder_lr_scale is None:
        cfg.encoder_lr_scale = 1.0 if cfg.random_init else 0.1
    with torch.random.fork_rng(devices=[]):  # the decoder's (and a random encoder's) initial weights: from --seed
        torch.manual_seed(cfg.seed)
        if cfg.random_init:
            model = build_unet(enc["timm_model"], len(cfg.classes))
        else:
            model, _ = unet_from_encoder(cfg.encoder, len(cfg.classes))
    model = model.to(device).to(memory_format=torch.channels_last)
    saved = saved_checkpoint(out)
    if cfg.epochs is None:  # not given: as the run being resumed began (older runs: 30), else the default
        cfg.epochs = (saved and SegmentConfig.from_dict(saved["config"]).epochs) or default_epochs(cfg.ssl)
    # the schedule spans --epochs; --max-steps only stops early (as in pretrain), so it may change on resume
    schedule = cfg.steps or math.ceil(len(labelled) / cfg.batch) * cfg.epochs
    total = min(schedule, cfg.max_steps) if cfg.max_steps is not None else schedule
    if cfg.warmup_steps is None:
        cfg.warmup_steps = min(100, int(0.05 * schedule))
    if saved is None:  # said once, when the run begins (its settings are fixed on resume)
        note_encoder_settings(cfg, schedule)
    encoder_params = list(model.encoder.parameters())
    encoder_ids = {id(p) for p in encoder_params}
    optimizer = torch.optim.AdamW([
        {"params": encoder_params, "lr": cfg.lr * cfg.encoder_lr_scale},
        {"params": [p for p in model.parameters() if id(p) not in encoder_ids], "lr": cfg.lr},
    ], weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, schedule, cfg.warmup_steps)
    meta = {
        "classes": list(cfg.classes),
        "image_size": int(cfg.image_size),
        "mean": [float(v) for v in enc["mean"]],
        "std": [float(v) for v in enc["std"]],
        "patch_size": int(store.patch_size),
        "patch_mpp": patch_mpp,
        "input_mpp": round(patch_mpp * store.patch_size / cfg.image_size, 6) if patch_mpp else None,
        "encoder_input_mpp": enc["input_mpp"],
        "timm_model": enc["timm_model"],
        "encoder": os.path.abspath(cfg.encoder) if not cfg.random_init else cfg.encoder,
        "encoder_sha256": enc["encoder_sha256"],
        "ssl": cfg.ssl,
        "stores": [os.path.abspath(s) for s in stores],
        "labels": os.path.abspath(labels_dir),
        "labelled_patches": int(len(labelled)),
        "unlabelled_patches": int(len(unlabelled)),
        "data_key": data_key(store, labels),
    }
    if cfg.recalibrate_bn and saved is None:  # a resumed run's checkpoint holds the statistics it trained with
        count = recalibrate_encoder_bn(model, store, InputSpec.from_meta(meta), device, cfg.seed)
        log(f"encoder batch-norm statistics re-estimated on {count} patches of the stores, held for the run")
    teacher = None
    if cfg.ssl == "fixmatch":
        teacher = copy.deepcopy(model).eval()
        teacher.requires_grad_(False)
    return SegmentRun(cfg=cfg, out=out, store=store, labels=labels, labelled=labelled, unlabelled=unlabelled,
                      meta=meta, model=model, teacher=teacher, optimizer=optimizer, scheduler=scheduler,
                      device=device, total_steps=total, schedule_steps=schedule, bf16=native_bf16(device),
                      resume_from=saved)


def note_encoder_settings(cfg: SegmentConfig, schedule: int) -> None:
    """Say on stderr what the encoder settings amount to where that is not what their names suggest:
    a freeze as long as the schedule (a decoder-only fit) and a random encoder frozen or recalibrated."""
    if cfg.freeze_encoder_steps >= schedule:
        kept = "its batch-norm statistics re-estimated, " if cfg.recalibrate_bn else ""
        log(f"--freeze-encoder-steps {cfg.freeze_encoder_steps} spans the whole {schedule}-step schedule: the "
            f"encoder's weights stay as given ({kept}only the decoder trains)")
    flags = [flag for flag, on in (("--freeze-encoder-steps", cfg.freeze_encoder_steps),
                                   ("--recalibrate-bn", cfg.recalibrate_bn)) if on]
    if cfg.random_init and flags:
        log(f"warning: {cfg.encoder} is a random-init encoder and {' / '.join(flags)} is meant for a pretrained "
            "one (it holds random weights or the statistics of random features); drop it, or give an exported "
            "encoder file")


def saved_checkpoint(out: str) -> dict | None:
    """The checkpoint of the run in ``out``, if there is one."""
    if not os.path.exists(os.path.join(out, SEGMENT_CHECKPOINT)):
        return None
    return read_segment_checkpoint(out)


def data_key(store: PatchStore, labels: LabelSet) -> str:
    """A digest of what the run learns from: every label file's bytes and every store slide's
    name, fingerprint and patch count. A resume with other labels or stores would not be exact."""
    digest = hashlib.sha256()
    for name in sorted(labels.slides):
        digest.update(name.encode() + b"\0" + file_sha256(labels.slides[name].source).encode())
    for name, start, end in store.slide_ranges():
        fingerprint = str(store.slide_group(name).attrs.get("fingerprint", ""))
        digest.update(f"{name}:{fingerprint}:{end - start}".encode())
    return digest.hexdigest()


def open_segment_folder(run: SegmentRun) -> None:
    """Create the run folder, or resume from its checkpoint when the run's settings match."""
    try:
        os.makedirs(run.out, exist_ok=True)
    except OSError as exc:
        raise SimclrPathError(f"{run.out}: run folder cannot be created ({exc.strerror}); choose another --out") from None
    ckpt, run.resume_from = run.resume_from, None
    if ckpt is None:
        return
    saved = SegmentConfig.from_dict(ckpt["config"])
    changed = [k for k in FIXED_ON_RESUME if getattr(saved, k) != getattr(run.cfg, k)
               and not (k in FIXMATCH_ONLY and saved.ssl == run.cfg.ssl == "none")]
    if ckpt["meta"].get("encoder_sha256") != run.meta["encoder_sha256"]:
        changed.append("encoder file contents")
    if ckpt["meta"].get("data_key") != run.meta["data_key"]:
        changed.append("the labels or the stores' slides")
    if changed:
        raise SimclrPathError(
            f"{run.out}: holds a segment run with other settings ({', '.join(changed)}); rerun with the same settings "
            "to resume, or choose another --out"
        )
    run.model.load_state_dict(ckpt["model"])
    if run.teacher is not None:
        run.teacher.load_state_dict(ckpt["teacher"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.step = run.saved_step = int(ckpt["step"])
    run.scheduler.step_update(run.step)


def model_input(images: torch.Tensor, run: SegmentRun) -> torch.Tensor:
    """uint8 NHWC on the host -> normalised float NCHW (channels_last) on the device, as at inference."""
    return run.spec.to_model(images, run.device, channels_last=True, layout="NHWC")


def train_step(run: SegmentRun, batch) -> dict:
    """One optimiser step on a labelled (+ unlabelled) batch; returns its losses as tensors."""
    images, masks, weak, strong = batch
    cfg, device = run.cfg, run.device
    masks = masks.to(device, non_blocking=True).long()
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=run.bf16)
    if cfg.freeze_encoder_steps or cfg.recalibrate_bn:
        set_encoder_mode(run.model, run.step < cfg.freeze_encoder_steps, hold_bn=cfg.recalibrate_bn)
    x = model_input(images, run)
    pseudo = confident = None
    if weak is not None:
        with torch.no_grad(), torch.autocast(**autocast):
            probs = run.teacher(model_input(weak, run)).float().softmax(1)
        confidence, pseudo = probs.max(1)
        confident = confidence >= cfg.threshold
        strong_x = model_input(strong, run)
        if cfg.cutmix > 0:
            pasted = cutmix_boxes(len(strong), strong_x.shape[-1], cfg.cutmix, cfg.seed, run.step).to(device)
            strong_x, pseudo, confident = paste_neighbours(pasted, strong_x, pseudo, confident)
    with torch.autocast(**autocast):
        logits = run.model(x).float()
        if pseudo is not None:  # its own pass: batch statistics of strong views only, running ones untouched
            with running_stats_frozen(run.model):
                strong_logits = run.model(strong_x).float()
    # mean over labelled pixels; 0 (not NaN) for a batch whose labels vanished in the resize to image_size
    labelled = (masks != IGNORE).sum().clamp(min=1)
    sup = F.cross_entropy(logits, masks, ignore_index=IGNORE, reduction="sum") / labelled
    losses = {"sup_loss": sup}
    loss = sup
    if pseudo is not None:
        per_pixel = F.cross_entropy(strong_logits, pseudo, reduction="none")
        unsup = (per_pixel * confident).mean()
        loss = loss + unsup_weight(run) * unsup
        losses.update(unsup_loss=unsup, confident=confident.float().mean())
    if not torch.isfinite(loss):
        raise SimclrPathError(
            f"{run.out}: the loss became {float(loss)} at step {run.step + 1}; the checkpoint of step "
            f"{run.step} is kept - lower --lr and rerun with a new --out"
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.consistent = False
    run.optimizer.step()
    run.step += 1
    run.scheduler.step_update(run.step)
    if run.teacher is not None:
        update_teacher(run.teacher, run.model, cfg.ema)
    run.consistent = True
    losses["loss"] = loss
    return {k: v.detach() for k, v in losses.items()}


@contextlib.contextmanager
def running_stats_frozen(model: torch.nn.Module):
    """Batch norm layers in training mode still normalise with the batch's own statistics but leave
    their running statistics (and their batch count) - what the teacher and inference normalise
    with - alone. Layers in eval mode (a frozen or held encoder's) go on using their running statistics.

    FixMatch's strong views (stain, colour, grayscale, CutMix) are not the images the network will
    be shown; mixed into the running statistics they shifted every prediction the teacher made.
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False  # in training mode: batch statistics, nothing recorded
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def unsup_weight(run: SegmentRun) -> float:
    """Weight of the unsupervised loss at the coming step: a linear ramp from 0 to 1 over
    ``rampup`` of the schedule (the teacher starts as the untrained decoder), then 1."""
    ramp = run.cfg.rampup * run.schedule_steps
    return 1.0 if ramp <= 0 else min(1.0, (run.step + 1) / ramp)


@torch.no_grad()
def update_teacher(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher = decay * teacher + (1 - decay) * student for weights; buffers (BN statistics) copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def train(run: SegmentRun, metrics: MetricsLog, progress) -> None:
    """Steps from ``run.step`` to ``run.total_steps`` (or SIGTERM), logging and checkpointing."""
    cfg = run.cfg
    sampler = StepBatches(run.labelled, run.unlabelled, cfg.batch, cfg.unlabelled_batch, cfg.seed, run.step,
                          run.total_steps)
    dataset = SegmentationSamples(run.store, run.labels, run.spec)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=run.device.type == "cuda",
        collate_fn=lambda samples: collate(samples, cfg.batch), persistent_workers=False,
        worker_init_fn=worker_init,  # workers leave SIGTERM to this process, as pretrain's do
    )
    run.model.train()
    with run_batches(loader) as batches:  # its workers are ended when the loop ends, however it ends
        window, started, images = [], time.perf_counter(), 0
        for batch in batches:
            losses = train_step(run, batch)
            window.append(losses)
            images += len(batch[0]) + (len(batch[2]) if batch[2] is not None else 0)
            last = run.step == run.total_steps
            if run.step % cfg.log_every == 0 or run.step == 1 or last:
                record = {"step": run.step, **{k: round(float(torch.stack([w[k] for w in window]).mean()), 5)
                                                for k in window[0]},
                          "lr": run.optimizer.param_groups[1]["lr"],
                          "img_per_s": round(images / max(time.perf_counter() - started, 1e-9), 2)}
                metrics.write(record)
                run.records.append(record)
                window, started, images = [], time.perf_counter(), 0
                progress(run.step, record)
            if run.step % cfg.checkpoint_every == 0 or last:
                run.save_checkpoint()
            if run.stop is not None and run.stop.requested:
                if run.saved_step < run.step:
                    run.save_checkpoint()
                break


def train_segmentation(stores: list[str], labels_dir: str, out: str, cfg: SegmentConfig,
                       progress: bool = True) -> dict:
    """Train (or resume) a segmentation run; returns its JSON summary."""
    with StopOnSigterm() as stop, locked_run_folder(out, "simclr-path segment"):
        run = build_segment_run(stores, labels_dir, out, cfg)
        run.stop = stop
        open_segment_folder(run)
        save_segment_config(cfg, os.path.join(out, "config.yaml"))
        log(describe(run))
        metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), run.step)
        started = time.perf_counter()
        try:
            with _progress(run, progress) as report:
                train(run, metrics, report)
        except KeyboardInterrupt:
            # Ctrl-C: keep the steps since the last checkpoint, unless it came in the middle of an update
            if run.consistent and run.step > run.saved_step:
                run.save_checkpoint()
            raise
        plot_curves(metrics.records, os.path.join(out, "curves.png"), loss_label="segmentation loss")
    if stop.requested and run.step < run.total_steps:
        raise StoppedBySignal(
            f"stopped on SIGTERM after step {run.step}; checkpoint saved to {run.checkpoint_path} - "
            "rerun the same command to resume"
        )
    last = metrics.records[-1] if metrics.records else {}
    return {
        "run": os.path.abspath(out),
        "checkpoint": os.path.abspath(run.checkpoint_path),
        "encoder": run.meta["encoder"],
        "classes": run.meta["classes"],
        "ssl": cfg.ssl,
        "device": str(run.device),
        "bf16": run.bf16,
        "image_size": cfg.image_size,
        "input_mpp": run.meta["input_mpp"],
        "labelled_patches": run.meta["labelled_patches"],
        "unlabelled_patches": run.meta["unlabelled_patches"],
        "step": run.step,
        "total_steps": run.total_steps,
        "first_loss": metrics.records[0]["loss"] if metrics.records else None,
        "last_loss": last.get("loss"),
        "seconds": round(time.perf_counter() - started, 2),
    }


def describe(run: SegmentRun) -> str:
    cfg = run.cfg
    return (f"Unet on {run.meta['timm_model']} ({'random init' if cfg.random_init else 'our encoder'}) on "
            f"{run.device.type}: {len(run.labelled)} labelled + {len(run.unlabelled)} unlabelled patches, "
            f"{len(cfg.classes)} classes, input {cfg.image_size} px"
            + (f" at {run.meta['input_mpp']:g} um/px" if run.meta["input_mpp"] else "")
            + f", ssl {cfg.ssl}, {run.total_steps} steps" + (f", resuming at step {run.step}" if run.step else ""))


class _progress:
    """A rich progress bar on stderr (a terminal only), updated at each logged step."""

    def __init__(self, run: SegmentRun, enabled: bool):
        self.run, self.bar = run, None
        if enabled and stderr_console().is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("segment"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=stderr_console())

    def __enter__(self):
        if self.bar is not None:
            self.task = self.bar.add_task("segment", total=self.run.total_steps, completed=self.run.step, loss="")
            self.bar.start()
        return self.update

    def update(self, step: int, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{record['loss']:.4f}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
