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


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds this device up: a CUDA GPU of compute capability 8.0 or more
    (Ampere, Hopper: bf16 tensor cores), or a CPU with AVX512-BF16 or AMX (where oneDNN runs bf16
    convolutions natively: 1.6x the fp32 views/s of resnet18 on a 2-core EPYC). Older GPUs (V100,
    T4) and other CPUs emulate bf16 and would only get slower."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without these probes: assume no native bf16
        return False


def precision_name(dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``fp32``: what a run's first line and summary call its precision."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
