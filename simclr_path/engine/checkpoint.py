"""Training checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint holds the model (backbone + head, no wrapper prefixes), optimiser, scheduler, RNG
states, the data position (epoch, batch within the epoch) and the resolved config. It is written
to a temporary file in the same folder, flushed to disk, then renamed over the previous one, so a
crash or a full disk never leaves a half-written ``checkpoint.pt``.
"""

from __future__ import annotations

import errno
import os

import torch

from simclr_path.errors import SimclrPathError
from simclr_path.runtime.files import load_torch_file

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(state: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise SimclrPathError(
            f"{path}: cannot write the checkpoint ({reason}); the previous checkpoint is kept - "
            "free space and rerun the same command to resume"
        ) from None


def load_checkpoint(path: str, map_location="cpu", encoder_fix: str | None = None) -> dict:
    """The training checkpoint at ``path``, read with ``weights_only=True``; a one-line error names
    what is wrong with a file that is not one (empty, text, damaged, an exported encoder: then
    ``encoder_fix`` says what to pass instead, by default the run it was exported from)."""
    if not os.path.exists(path):
        raise SimclrPathError(f"{path}: no such checkpoint")
    state = load_torch_file(path, "checkpoint",
                            "pass the --out folder of 'simclr-path pretrain' (or 'segment'), or its checkpoint.pt",
                            map_location)
    if isinstance(state, dict) and "state_dict" in state and "simclr_path" in state:
        raise SimclrPathError(f"{path}: an exported encoder, not a training checkpoint; "
                              + (encoder_fix or "pass the run folder it was exported from"))
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise SimclrPathError(f"{path}: not a simclr-path checkpoint (no model/config inside)")
    return state


def strip_prefixes(state_dict: dict, prefixes=("module.", "_orig_mod.")) -> dict:
    """Remove wrapper prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``) as whole
    prefixes, repeatedly, never character by character."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out
