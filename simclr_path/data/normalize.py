"""Normalisation on the device: views travel as uint8 and become floats only where the model runs."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(views: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, scaled to [0, 1] and standardised; runs on the views' device.

    ``mean``/``std`` are sequences, or float32 tensors already on that device (the training loop
    makes them once: building them from Python numbers every step would copy to the GPU and wait).
    """
    mean = torch.as_tensor(mean, device=views.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(std, device=views.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (views.float().div_(255.0) - mean) / std
