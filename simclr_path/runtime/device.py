"""Choosing the torch device a command runs on."""

from __future__ import annotations

import torch

from simclr_path.errors import SimclrPathError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when a GPU is visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SimclrPathError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SimclrPathError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    return device
