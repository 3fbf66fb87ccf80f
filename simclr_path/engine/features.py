"""Running an encoder over many images: preprocessing to its input, batched inference.

Images become encoder inputs through :mod:`simclr_path.data.input_spec` (resized by the house
rule, scaled to [0, 1] and standardised with the encoder's mean/std), exactly as in pretraining's
kNN check and in ``segment``. On CUDA the forward runs under bf16 autocast; features come back as float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from simclr_path.data.input_spec import to_model_input
from simclr_path.runtime.images import resize_image
from simclr_path.store.ingest import read_image


class EncoderInputs(torch.utils.data.Dataset):
    """uint8 (3, S, S) tensors of ``images`` (a PatchStore, or a sequence of arrays or image paths)."""

    def __init__(self, images: Sequence, size: int):
        self.images = images
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if isinstance(image, (str, Path)):
            image = read_image(Path(image))
        return torch.from_numpy(np.ascontiguousarray(resize_image(image, self.size).transpose(2, 0, 1)))


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: Sequence, size: int, mean, std, device: torch.device,
                     batch_size: int = 128, workers: int = 2, on_batch=None) -> torch.Tensor:
    """(N, D) float32 features of ``images`` in order."""
    loader = torch.utils.data.DataLoader(EncoderInputs(images, size), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))  # leaves global RNG alone
    was_training = model.training
    model.eval()
    out = []
    for batch in loader:
        x = to_model_input(batch, mean, std, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(x).float().cpu())
        if on_batch is not None:
            on_batch(len(batch))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)
