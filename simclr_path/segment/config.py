"""The settings of a ``segment`` run, recorded in its ``config.yaml`` and checkpoint."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

import yaml

from simclr_path.errors import SimclrPathError
from simclr_path.segment.masks import MASK_FORMATS

#: Random initialisation instead of an exported encoder: ``timm:<model name>`` (a baseline).
RANDOM_INIT_PREFIX = "timm:"
#: Settings that define the run; a resume with any of them changed is refused.
FIXED_ON_RESUME = ("encoder", "classes", "image_size", "batch", "ssl", "unlabeled_ratio", "threshold", "ema",
                   "rampup", "cutmix", "epochs", "steps", "lr", "encoder_lr_scale", "weight_decay", "seed",
                   "warmup_steps", "mask_downsample", "mask_format", "freeze_encoder_steps", "recalibrate_bn")

#: Settings that shape only FixMatch training: a supervised-only run (``ssl: none``) ignores them.
FIXMATCH_ONLY = ("threshold", "rampup", "cutmix", "unlabeled_ratio", "ema")

#: Settings added after the first release, as runs saved before them trained (no CutMix).
PREDATED = {"cutmix": 0.0, "mask_format": "index", "freeze_encoder_steps": 0, "recalibrate_bn": False}

#: Default schedule lengths in passes over the labelled patches. FixMatch needs the longer one: its
#: EMA teacher is confident on few pixels early on (bench/active_learning.py, GlaS, 5% labelled,
#: 3 seeds: 0.4 Dice points below supervised-only at 35 epochs, 0.7 above at 87).
SUPERVISED_EPOCHS = 30
FIXMATCH_EPOCHS = 90


@dataclass
class SegmentConfig:
    """Arguments of :func:`simclr_path.segment.train.train_segmentation`.

    Args:
        encoder: exported encoder file, or ``timm:<name>`` for a randomly initialised encoder.
        classes: class names (index = class value); None: from the masks.
        image_size: network input side (multiple of 32); None: matched to the encoder's
            pretraining resolution (:func:`simclr_path.segment.model.matched_image_size`).
        batch: labelled patches per step (default 8).
        epochs: passes over the labelled patches: the length of the lr schedule. None: what the
            run being resumed began with, else :func:`default_epochs` (30; 90 with FixMatch).
        steps: the schedule's length in steps instead of ``epochs`` (a fixed training budget
            whatever the number of labelled patches).
        max_steps: stop after this many steps (the schedule still spans ``epochs`` or ``steps``).
        lr: AdamW learning rate of the decoder (default 1e-3); the encoder's is ``lr *
            encoder_lr_scale`` (default 0.1: pretrained weights are adapted gently; 1.0 for random init).
        weight_decay: AdamW weight decay (default 1e-4).
        warmup_steps: linear warm-up before cosine decay (default: 5% of the steps, at most 100).
        freeze_encoder_steps: the first N steps train the decoder only; the encoder's weights and
            batch-norm statistics stay as given (default 0) - :mod:`simclr_path.segment.finetune`.
        recalibrate_bn: before the first step, re-estimate the encoder's batch-norm running
            statistics on the stores' patches as inference sees them, and hold them for the whole
            run (the encoder's batch norm in eval mode; its scale and shift learn once the encoder
            trains) (default False).
        ssl: ``none`` (supervised on labelled pixels only) or ``fixmatch``.
        threshold: FixMatch confidence above which a teacher's pixel becomes a pseudo-label (0.95).
        rampup: fraction of the schedule over which the unsupervised loss weight rises linearly
            from 0 to 1 (default 0.2), so the teacher's first, untrained guesses are not learnt.
        unlabeled_ratio: unlabelled patches per labelled patch in a step (default 1).
        cutmix: probability that a FixMatch strong view gets a rectangle of another unlabelled
            patch pasted in, with the teacher's pseudo-labels moved along (default 0.5; 0: off).
        ema: decay of the teacher's exponential moving average of the student (default 0.99).
        mask_downsample: level-0 px per mask px of the label masks (None: inferred from mask size).
        mask_format: what mask values mean: ``auto`` (default), ``index`` or ``binary``
            (:mod:`simclr_path.segment.masks`); the run records what ``auto`` resolved to.
        seed, device, workers, log_every, checkpoint_every: as in ``pretrain``.
    """

    encoder: str = ""
    classes: list[str] | None = None
    image_size: int | None = None
    batch: int = 8
    epochs: int | None = None
    steps: int | None = None
    max_steps: int | None = None
    lr: float = 1e-3
    encoder_lr_scale: float | None = None
    weight_decay: float = 1e-4
    warmup_steps: int | None = None
    freeze_encoder_steps: int = 0
    recalibrate_bn: bool = False
    ssl: str = "none"
    threshold: float = 0.95
    rampup: float = 0.2
    unlabeled_ratio: float = 1.0
    cutmix: float = 0.5
    ema: float = 0.99
    mask_downsample: float | None = None
    mask_format: str = "auto"
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 100

    def validate(self) -> None:
        checks = [
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (self.epochs is None or self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}"),
            (0 <= self.rampup <= 1, f"--rampup is a fraction of the schedule in [0, 1], got {self.rampup}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.encoder_lr_scale is None or self.encoder_lr_scale >= 0,
             f"--encoder-lr-scale must be >= 0, got {self.encoder_lr_scale}"),
            (self.freeze_encoder_steps >= 0, f"--freeze-encoder-steps must be >= 0, got {self.freeze_encoder_steps}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.ssl in ("none", "fixmatch"), f"--ssl must be none or fixmatch, got {self.ssl!r}"),
            (0 < self.threshold < 1, f"--threshold is a probability in (0, 1), got {self.threshold}"),
            (0 <= self.cutmix <= 1, f"--cutmix is a probability in [0, 1], got {self.cutmix}"),
            (self.unlabeled_ratio >= 0, f"--unlabeled-ratio must be >= 0, got {self.unlabeled_ratio}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.log_every >= 1 and self.checkpoint_every >= 1, "--log-every and --checkpoint-every must be >= 1"),
            (self.mask_downsample is None or self.mask_downsample > 0,
             f"--mask-downsample must be > 0, got {self.mask_downsample}"),
            (self.mask_format in MASK_FORMATS,
             f"--mask-format must be one of {', '.join(MASK_FORMATS)}, got {self.mask_format!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SimclrPathError(message)
        if self.ssl == "fixmatch" and self.unlabeled_ratio <= 0:
            raise SimclrPathError("--ssl fixmatch needs unlabelled patches in each step; set --unlabeled-ratio > 0")

    @property
    def random_init(self) -> bool:
        return self.encoder.startswith(RANDOM_INIT_PREFIX)

    @property
    def unlabelled_batch(self) -> int:
        return int(round(self.batch * self.unlabeled_ratio)) if self.ssl == "fixmatch" else 0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentConfig":
        """A saved config; a setting it predates reads as what such a run trained with."""
        known = {f.name for f in fields(cls)}
        return cls(**{**PREDATED, **{k: v for k, v in data.items() if k in known}})


def default_epochs(ssl: str) -> int:
    """The schedule, in passes over the labelled patches, of a run that does not give one."""
    return FIXMATCH_EPOCHS if ssl == "fixmatch" else SUPERVISED_EPOCHS


def save_segment_config(cfg: SegmentConfig, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(cfg.as_dict(), fh, sort_keys=False)
    os.replace(tmp, path)
