"""Datasets over patch stores: two augmented views per patch for pretraining."""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch

from simclr_path.data.views import ViewConfig, build_transform, sample_seed


class TwoViewDataset(torch.utils.data.Dataset):
    """Each item is two independently augmented uint8 views (3, S, S) of the same patch.

    Args:
        store: a :class:`~simclr_path.PatchStore` (or any sequence of HxWx3 uint8 arrays).
        cfg: augmentation settings.
        seed: run seed; call :meth:`set_epoch` so every epoch draws fresh views.
    """

    def __init__(self, store, cfg: ViewConfig, seed: int = 0):
        self.store = store
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        self._transform: A.Compose | None = None  # built lazily in each worker

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int):
        if self._transform is None:
            self._transform = build_transform(self.cfg)
        image = self.store[index]
        self._transform.set_random_seed(sample_seed(self.seed, self.epoch, index))
        views = [self._transform(image=image)["image"] for _ in range(2)]
        return tuple(torch.from_numpy(np.ascontiguousarray(v.transpose(2, 0, 1))) for v in views)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_transform"] = None
        return state
