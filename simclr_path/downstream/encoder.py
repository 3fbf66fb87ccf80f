"""Exporting the pretrained encoder, and loading it back.

The export holds the backbone's weights only (no projection head), with keys exactly as
``timm.create_model(name, num_classes=0)`` names them, so timm loads it with every key matched::

    model = timm.create_model("resnet50", num_classes=0, checkpoint_path="encoder.pt")

plus the metadata needed to use it (timm model name, input size, mean/std, patch resolution, a
training summary): under the ``simclr_path`` key of the torch file, or as JSON in the safetensors
header. ``load_encoder(path)`` does all of it in one call.
"""

from __future__ import annotations

import json
import os

import torch

from simclr_path import __version__
from simclr_path.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, strip_prefixes
from simclr_path.engine.config import input_size, upgrade_config_dict
from simclr_path.errors import SimclrPathError, first_line
from simclr_path.runtime.console import log
from simclr_path.runtime.files import load_torch_file

ENCODER_FORMAT = "simclr-path encoder"
BACKBONE_PREFIX = "backbone."


def backbone_state_dict(model_state: dict) -> dict:
    """Backbone weights of a SimCLR model state, with wrapper and ``backbone.`` prefixes removed."""
    state = strip_prefixes(model_state)
    return {k[len(BACKBONE_PREFIX):]: v.detach().clone().contiguous() for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}


def _resolve_checkpoint(source: str) -> str:
    if os.path.isdir(source):
        path = os.path.join(source, CHECKPOINT_NAME)
        if not os.path.exists(path):
            raise SimclrPathError(f"{source}: run folder has no {CHECKPOINT_NAME}; run 'simclr-path pretrain' first")
        return path
    if not os.path.exists(source):
        raise SimclrPathError(f"{source}: no such run folder or checkpoint")
    return source


def input_mpp(patch_mpp: float | None, patch_size: int | None, image_size: int) -> float | None:
    """Microns per input pixel: store patches of ``patch_size`` px at ``patch_mpp`` shown at ``image_size``."""
    if patch_mpp is None or not patch_size:
        return None
    return round(patch_mpp * patch_size / image_size, 6)


def export_encoder(source: str, out: str, fmt: str | None = None) -> dict:
    """Write the encoder of the run folder or checkpoint ``source`` to ``out``; returns its metadata."""
    import timm

    fmt = fmt or ("safetensors" if out.endswith(".safetensors") else "torch")
    if fmt not in ("torch", "safetensors"):
        raise SimclrPathError(f"--format must be torch or safetensors, got {fmt!r}")
    ckpt_path = _resolve_checkpoint(source)
    if os.path.realpath(out) == os.path.realpath(ckpt_path):
        raise SimclrPathError(
            f"{out}: is the checkpoint being exported; the encoder would replace the training run - choose another "
            f"OUT, e.g. {os.path.join(os.path.dirname(out) or '.', 'encoder.pt')}"
        )
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("kind") is not None:  # pretrain checkpoints carry no kind; a segment run's does
        raise SimclrPathError(
            f"{source}: a {ckpt['kind']!r} run, not a pretraining run; export takes the --out folder of "
            "'simclr-path pretrain' (segment-eval and predict use a segment run as it is)"
        )
    cfg = upgrade_config_dict(ckpt["config"], source, quiet=True)
    name = cfg["model"]["backbone"]
    weights = backbone_state_dict(ckpt["model"])
    model = timm.create_model(name, pretrained=False, num_classes=0)
    try:
        model.load_state_dict(weights, strict=True)  # the export must match timm's names exactly
    except RuntimeError as exc:
        raise SimclrPathError(f"{source}: weights do not match timm's {name} ({first_line(exc)})") from None
    store = dict(ckpt.get("store", {}))
    if len({(r["target_mpp"], r["magnification"]) for r in store.get("resolutions", [])}) > 1:
        # a --mixed-mpp run has no one patch resolution: store_resolutions below lists them all
        store["target_mpp"] = store["magnification"] = None
    views = cfg["views"]
    size = input_size(int(views["image_size"]), float(cfg["model"].get("input_scale", 1.0)))
    metadata = {
        "format": ENCODER_FORMAT,
        "version": 1,
        "tool_version": __version__,
        "timm_model": name,
        "num_features": int(model.num_features),
        "input_size": [3, size, size],  # a whole store patch, resized to this
        "view_size": int(views["image_size"]),  # the crops pretraining saw
        "mean": [float(x) for x in views["mean"]],
        "std": [float(x) for x in views["std"]],
        "patch_mpp": store.get("target_mpp"),
        "patch_magnification": store.get("magnification"),
        "patch_size": store.get("patch_size"),
        # what one input pixel is when a whole patch is resized to the input size, as embed/eval do
        "input_mpp": input_mpp(store.get("target_mpp"), store.get("patch_size"), size),
        "crop_scale": [float(x) for x in views["crop_scale"]],
        "store_resolutions": store.get("resolutions", []),
        "training": {
            "steps": int(ckpt["step"]),
            "total_steps": int(ckpt.get("total_steps", ckpt["step"])),
            "epoch": int(ckpt["epoch"]),
            "global_batch": int(cfg["optim"]["global_batch"]),
            "temperature": float(cfg["loss"]["temperature"]),
            "patches": store.get("patches"),
            "stores": store.get("paths", []),
        },
    }
    training = metadata["training"]
    if training["steps"] < training["total_steps"]:
        log(f"note: {source}: the run is unfinished, step {training['steps']} of {training['total_steps']}; "
            "this encoder is from that step - resume its pretrain command (without --max-steps) to finish it")
    if str(out).endswith(os.sep) or os.path.isdir(out):
        raise SimclrPathError(f"{out}: is a folder; give the encoder file to write, e.g. "
                              f"{os.path.join(out, 'encoder.pt')}")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise SimclrPathError(f"{out}: folder {parent} does not exist; create it first")
    tmp = f"{out}.tmp"
    try:
        if fmt == "torch":
            torch.save({"state_dict": weights, "simclr_path": metadata}, tmp)
        else:
            from safetensors.torch import save_file

            save_file(weights, tmp, metadata={"simclr_path": json.dumps(metadata)})
        os.replace(tmp, out)
    except (OSError, RuntimeError) as exc:  # torch.save reports an unwritable file as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc, 120)
        raise SimclrPathError(f"{out}: cannot write the encoder ({reason}); choose a folder you can write") from None
    return metadata


def read_encoder(path: str) -> tuple[dict, dict]:
    """(state_dict, metadata) of an exported encoder, torch or safetensors, loaded safely.

    A file that is not one is a one-line error saying what it is instead: a pretraining checkpoint or
    run folder ("export it first"), a segment run, an empty, text or damaged file.
    """
    export_first = "export one with 'simclr-path export RUN encoder.pt'"
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, CHECKPOINT_NAME)):
            raise SimclrPathError(f"{path}: a run folder, not an encoder; export it first: "
                                  f"simclr-path export {path} encoder.pt")
        raise SimclrPathError(f"{path}: a folder, not an encoder file; {export_first}")
    if not os.path.exists(path):
        raise SimclrPathError(f"{path}: no such encoder file")
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(path, framework="pt") as fh:
                metadata = json.loads((fh.metadata() or {}).get("simclr_path", "{}"))
            weights = load_file(path)
        except Exception as exc:
            reason = "the file is empty, 0 bytes" if os.path.getsize(path) == 0 else first_line(exc, 160)
            raise SimclrPathError(f"{path}: not a readable encoder file ({reason}); {export_first}") from None
    else:
        blob = load_torch_file(path, "encoder file", export_first)
        if not isinstance(blob, dict) or "state_dict" not in blob:
            raise SimclrPathError(f"{path}: {_what_instead(blob, path)}")
        weights, metadata = blob["state_dict"], blob.get("simclr_path", {})
    if not isinstance(metadata, dict) or metadata.get("format") != ENCODER_FORMAT:
        raise SimclrPathError(f"{path}: not a simclr-path encoder (no metadata); export one with 'simclr-path export'")
    return weights, metadata


def _what_instead(blob, path: str) -> str:
    """What a torch file given as an encoder holds instead, and what to do."""
    if isinstance(blob, dict) and "model" in blob and "config" in blob:
        kind = blob.get("kind")
        if kind is None:  # pretrain checkpoints carry no kind
            return f"a pretraining checkpoint, not an encoder; export it first: simclr-path export {path} encoder.pt"
        return (f"a {kind!r} checkpoint, not an encoder; pass the encoder.pt that run was trained from "
                "(the run folder itself goes to segment-eval, predict or select --model)")
    return "not a simclr-path encoder (no state_dict inside); export one with 'simclr-path export RUN encoder.pt'"


def load_encoder(path: str, features_only: bool = False, **timm_kwargs):
    """Build the timm model of an exported encoder and load its weights (every key matched).

    Args:
        path: ``encoder.pt`` or ``encoder.safetensors`` from ``simclr-path export``.
        features_only: return timm's multi-scale feature extractor (for segmentation decoders).
        timm_kwargs: passed to ``timm.create_model`` (e.g. ``out_indices``).

    Returns:
        ``(model, metadata)``; the model is in eval mode, its ``pretrained_cfg`` carries the
        encoder's mean, std and input size.
    """
    import timm

    weights, metadata = read_encoder(path)
    name = metadata["timm_model"]
    model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
    model.load_state_dict(weights, strict=True)
    if features_only:
        features = timm.create_model(name, pretrained=False, features_only=True, **timm_kwargs)
        wanted = features.state_dict()
        source = model.state_dict()
        mapped = {}
        for key in wanted:
            candidate = key[len("model."):] if key.startswith("model.") and key not in source else key
            if candidate not in source:
                raise SimclrPathError(f"{path}: feature extractor key {key!r} has no weight in the encoder")
            mapped[key] = source[candidate]
        features.load_state_dict(mapped, strict=True)
        model = features
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.update(mean=tuple(metadata["mean"]), std=tuple(metadata["std"]), input_size=tuple(metadata["input_size"]))
    model.pretrained_cfg = cfg
    return model.eval(), metadata
