"""Pretraining configuration: dataclasses, YAML presets, command-line overrides.

A preset is a YAML file with the sections ``model``, ``views``, ``loss``, ``optim`` and ``run``; any key left
out keeps its default. ``--config small`` names a preset shipped in the package (``simclr_path.configs``,
the repository's ``configs/`` folder);
a path names any file. The resolved config is saved as ``config.yaml`` in the run folder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from simclr_path.data.views import ViewConfig
from simclr_path.errors import SimclrPathError, first_line
from simclr_path.optim.optimizers import OPTIMIZERS
from simclr_path.runtime.console import log


def presets():
    """The shipped presets folder (``configs/`` in the source tree, ``simclr_path/configs`` installed)."""
    return resources.files("simclr_path.configs")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def input_size(image_size: int, input_scale: float) -> int:
    """Whole-patch input side for views of ``image_size`` px: ``image_size x input_scale``, rounded."""
    return int(round(image_size * input_scale))


@dataclass
class ModelConfig:
    """Backbone and projection head (see :class:`simclr_path.models.SimCLRModel`).

    ``input_scale``: the exported encoder (and the kNN check) takes a whole store patch resized to
    ``views.image_size x input_scale`` px (:meth:`PretrainConfig.input_size`). Views are crops of a
    patch; with ``input_scale`` near one over the crops' typical side fraction, a whole patch keeps
    the pixel scale the views had.
    """

    backbone: str = "resnet50"
    pretrained: str | None = None
    head_hidden: int | None = None  # None: the backbone's feature size
    head_out: int = 128
    head_layers: int = 3
    channels_last: bool = True
    compile: bool = False
    input_scale: float = 1.0


@dataclass
class LossConfig:
    """NT-Xent (see :class:`simclr_path.losses.NTXentLoss`)."""

    temperature: float = 0.1


@dataclass
class OptimConfig:
    """Optimiser and schedule. ``global_batch``: patches per step over all processes (two views each).
    ``optimizer``: ``lars`` (SimCLR's) or ``sgd`` (momentum SGD on the same groups)."""

    global_batch: int = 256
    epochs: int = 100
    base_lr: float = 0.3
    lr_scaling: str = "linear"  # linear: base * batch / 256; sqrt: base * sqrt(batch)
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coeff: float = 0.001  # LARS only
    optimizer: str = "lars"
    warmup_epochs: float = 10.0
    max_steps: int | None = None  # stop early (smoke runs); the schedule still spans all epochs


#: Where views are made (``run.augment``); see :func:`simclr_path.data.device_views.resolve_augment`.
AUGMENT_CHOICES = ("auto", "device", "cpu")


@dataclass
class RunConfig:
    """Where and how the loop runs."""

    device: str = "auto"  # auto: cuda if available, else cpu
    workers: int = 4
    seed: int = 0
    # mixed precision: bf16 autocast where native (CUDA compute capability >= 8, CPUs with AVX512-BF16/AMX),
    # fp16 autocast with a gradient scaler on older GPUs (V100, T4), fp32 on other CPUs
    bf16: bool = True
    # where the two views are made: "device" (the training GPU/CPU, whole batch at once; the loader
    # workers only decode), "cpu" (albumentations in the loader workers), "auto" (device on CUDA, else
    # cpu). A run records the resolved choice.
    augment: str = "auto"
    checkpoint_every: int = 500  # steps
    log_every: int = 10  # steps
    tensorboard: bool = False
    grad_cache_chunk: int | str | None = None  # gradient cache: views per chunk, "auto" (CUDA), or None
    eval_labeled: str | None = None  # labelled patches for a kNN check during training
    eval_every: int = 500  # steps between kNN checks
    eval_max_per_class: int = 250  # patches per class used by the check
    mixed_mpp: bool = False  # allow stores of different resolutions in one run
    allow_config_change: bool = False  # resume even when a training setting differs (recorded)
    exclude_qc: str = "pen,blur"  # QC reasons whose patches are left out (comma list; "none": keep all)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "PretrainConfig":
        data = upgrade_config_dict(data or {}, source)
        sections_known = [f.name for f in dataclasses.fields(cls)]
        unknown = set(data) - set(sections_known)
        if unknown:
            raise SimclrPathError(f"{source}: unknown section(s) {sorted(unknown)}; expected {', '.join(sections_known)}")
        sections = {}
        for f in dataclasses.fields(cls):
            section_cls = type(f.default_factory())
            values = data.get(f.name) or {}
            names = {x.name for x in dataclasses.fields(section_cls)}
            bad = set(values) - names
            if bad:
                raise SimclrPathError(f"{source}: unknown key(s) {sorted(bad)} in '{f.name}'; known: {sorted(names)}")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            sections[f.name] = section_cls(**values)
        return cls(**sections)

    def input_size(self) -> int:
        """Side in px at which the exported encoder takes a whole store patch."""
        return input_size(self.views.image_size, self.model.input_scale)

    def validate(self) -> None:
        o, v, r = self.optim, self.views, self.run
        checks = [
            (o.global_batch >= 2, f"--batch must be >= 2, got {o.global_batch}"),
            (o.epochs >= 1, f"--epochs must be >= 1, got {o.epochs}"),
            (o.base_lr > 0, f"--lr must be > 0, got {o.base_lr}"),
            (o.lr_scaling in ("linear", "sqrt"), f"lr_scaling must be linear or sqrt, got {o.lr_scaling!r}"),
            (o.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {o.optimizer!r}"),
            (self.loss.temperature > 0, f"--temperature must be > 0, got {self.loss.temperature}"),
            (o.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {o.warmup_epochs}"),
            (o.weight_decay >= 0, f"--weight-decay must be >= 0, got {o.weight_decay}"),
            (o.max_steps is None or o.max_steps >= 1, f"--max-steps must be >= 1, got {o.max_steps}"),
            (16 <= v.image_size <= 4096, f"--image-size must be in 16..4096, got {v.image_size}"),
            (_is_number(self.model.input_scale) and 0.25 <= self.model.input_scale <= 4,
             f"--input-scale must be in 0.25..4, got {self.model.input_scale!r}"),
            (r.workers >= 0, f"--workers must be >= 0, got {r.workers}"),
            (r.augment in AUGMENT_CHOICES, f"--augment must be one of {', '.join(AUGMENT_CHOICES)}, got {r.augment!r}"),
            (r.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {r.checkpoint_every}"),
            (r.eval_every >= 1, f"--eval-every must be >= 1, got {r.eval_every}"),
            (self.model.head_layers >= 1, f"head_layers must be >= 1, got {self.model.head_layers}"),
            (r.grad_cache_chunk is None or r.grad_cache_chunk == "auto"
             or (isinstance(r.grad_cache_chunk, int) and r.grad_cache_chunk >= 1),
             f"--chunk must be a number of views >= 1 or 'auto', got {r.grad_cache_chunk!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SimclrPathError(message)
        if not 16 <= self.input_size() <= 4096:
            raise SimclrPathError(f"--image-size x --input-scale = {self.input_size()} px (the export's input) "
                                  "must be in 16..4096")


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in presets().iterdir() if p.name.endswith(".yaml"))


#: Keys renamed because their old names misled: (section, old key) -> (section, new key).
RENAMED_KEYS = {
    ("optim", "batch"): ("optim", "global_batch"),
    ("optim", "temperature"): ("loss", "temperature"),
    ("run", "chunk"): ("run", "grad_cache_chunk"),
    ("run", "amp"): ("run", "bf16"),
}


def upgrade_config_dict(data: dict, source: str = "config", quiet: bool = False) -> dict:
    """A config dict with renamed keys moved to their new names (old YAML files and checkpoints).

    Each old key found is noted once on stderr unless ``quiet``; giving both names is an error.
    """
    data = {section: dict(values or {}) for section, values in data.items()}
    for (old_section, old_key), (new_section, new_key) in RENAMED_KEYS.items():
        values = data.get(old_section)
        if not values or old_key not in values:
            continue
        if new_key in data.get(new_section, {}):
            raise SimclrPathError(
                f"{source}: both {old_section}.{old_key} and its new name {new_section}.{new_key} are set; keep one"
            )
        data.setdefault(new_section, {})[new_key] = values.pop(old_key)
        if not quiet:
            log(f"note: {source}: {old_section}.{old_key} is now {new_section}.{new_key} (read as such)")
    return data


def resolve_preset(name_or_path: str):
    """A YAML path, or the name of a shipped preset; returns something with ``read_text()``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = presets() / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise SimclrPathError(f"{name_or_path}: no such config file or preset; presets: {', '.join(preset_names())}")


def load_config(name_or_path: str | None) -> PretrainConfig:
    if name_or_path is None:
        return PretrainConfig()
    path = resolve_preset(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SimclrPathError(f"{path}: not valid YAML ({first_line(exc)})") from None
    return PretrainConfig.from_dict(data, source=str(path))


def apply_overrides(cfg: PretrainConfig, **overrides) -> PretrainConfig:
    """Set ``section.key`` values given as ``key=value`` (None means: not given)."""
    where = {
        "batch": ("optim", "global_batch"), "epochs": "optim", "lr": ("optim", "base_lr"), "max_steps": "optim",
        "temperature": "loss", "backbone": "model", "pretrained": "model", "compile": "model", "input_scale": "model",
        "image_size": "views", "workers": "run", "device": "run", "seed": "run",
        "checkpoint_every": "run", "tensorboard": "run", "chunk": ("run", "grad_cache_chunk"),
        "eval_labeled": "run", "eval_every": "run", "weight_decay": "optim", "warmup_epochs": "optim",
        "optimizer": "optim", "mixed_mpp": "run", "allow_config_change": "run", "bf16": "run",
        "augment": "run",
        "exclude_qc": "run",
    }
    for key, value in overrides.items():
        if value is None:
            continue
        section, attr = where[key] if isinstance(where[key], tuple) else (where[key], key)
        setattr(getattr(cfg, section), attr, value)
    return cfg


#: Settings a resumed run may change freely: how long to run, where, how to log and check, the size
#: the export takes patches at. Every other setting shapes the training itself and must match the
#: checkpoint's.
RESUMABLE_KEYS = frozenset({
    "optim.max_steps", "model.compile", "model.channels_last", "model.input_scale",
    "run.workers", "run.log_every", "run.checkpoint_every", "run.tensorboard",
    "run.eval_labeled", "run.eval_every", "run.eval_max_per_class", "run.allow_config_change",
})


def changed_settings(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """``(section.key, saved value, current value)`` of every training setting that differs.

    ``saved`` is a checkpoint's config (old key names are read as the new ones), ``current`` the
    config of this invocation; keys in :data:`RESUMABLE_KEYS` are ignored.
    """
    # through the dataclasses: a key an older checkpoint lacks had the default the old run trained with,
    # except run.augment, whose default ("auto") is newer than the runs that lack it (they augmented on the CPU)
    saved = upgrade_config_dict(saved, quiet=True)
    saved.setdefault("run", {}).setdefault("augment", "cpu")
    saved = PretrainConfig.from_dict(saved).to_dict()
    changes = []
    for section, values in current.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            old = saved[section][key]
            if name not in RESUMABLE_KEYS and _as_lists(old) != _as_lists(value):
                changes.append((name, _as_lists(old), _as_lists(value)))
    return changes


def _as_lists(value):
    return [_as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def save_config(cfg: PretrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML: ``--config PATH`` repeats the run's settings. The permission
    ``--allow-config-change`` is for one invocation, so it is saved off."""
    data = cfg.to_dict()
    data["run"]["allow_config_change"] = False
    data = {s: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()} for s, d in data.items()}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    os.replace(tmp, path)
