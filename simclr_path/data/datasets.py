"""Datasets over patch stores: two augmented views per patch (``--augment cpu``), or the decoded patch
alone (``--augment device``, the views are made on the training device)."""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch

from simclr_path.data.views import ViewConfig, build_transform, draw_views, sample_seed


class TwoViewDataset(torch.utils.data.Dataset):
    """Each item is two independently augmented views of the same patch: uint8 HWC tensors (S, S, 3).

    ``dataset[i]`` uses the epoch set by :meth:`set_epoch`; ``dataset[(epoch, i)]`` names the epoch,
    which is how the run-long loader asks for items (its workers outlive epochs). The views of one
    item depend only on ``(seed, epoch, i)``.

    Args:
        store: a :class:`~simclr_path.PatchStore` (or any sequence of HxWx3 uint8 arrays).
        cfg: augmentation settings.
        seed: run seed.
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

    def __getitem__(self, item) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        if self._transform is None:
            self._transform = build_transform(self.cfg)
        views = draw_views(self._transform, self.store[index], sample_seed(self.seed, epoch, index))
        return tuple(torch.from_numpy(np.ascontiguousarray(v["image"])) for v in views)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_transform"] = None
        return state


class PatchDataset(torch.utils.data.Dataset):
    """Each item is one stored patch, decoded: a uint8 HWC tensor (P, P, 3), for views made on the
    training device (:class:`~simclr_path.data.device_views.DeviceViews`). The workers only read and
    decode; all randomness is drawn on the device, per step.

    ``dataset[(epoch, i)]`` is accepted as :class:`TwoViewDataset` accepts it (the epoch is unused).
    """

    def __init__(self, store, seed: int = 0):
        self.store = store
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:  # the views do not depend on it here
        pass

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, item) -> torch.Tensor:
        index = item[1] if isinstance(item, tuple) else item
        return torch.from_numpy(np.ascontiguousarray(self.store[index]))
