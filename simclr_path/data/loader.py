"""Data loading for pretraining: a resumable distributed sampler and the two-view DataLoader.

The order of patches in an epoch depends only on ``(seed, epoch)`` (``DistributedSampler``'s
shuffle), each rank takes its own slice, and a run resumed mid-epoch skips exactly the batches it
already trained on. Worker base seeds come from a generator seeded per epoch, never from the
global RNG, so building a loader does not disturb the model's random state.
"""

from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, DistributedSampler

from simclr_path.data.datasets import TwoViewDataset


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle, ``drop_last``) that can start partway through an epoch.

    Args:
        dataset: the dataset (only its length is used).
        num_replicas, rank: the process group's size and this process's rank.
        seed: shuffle seed shared by all ranks.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's order; skip its first ``start_index`` samples of this rank."""
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def _ignore_sigterm(worker_id: int) -> None:
    """Workers leave SIGTERM to the training process, which checkpoints and then ends them
    (a scheduler's ``scancel`` signals every process of the job, workers included)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(dataset: TwoViewDataset, sampler: ResumableSampler, per_rank_batch: int, workers: int,
                 pin_memory: bool) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(dataset.seed * 100_003 + sampler.epoch)
    return DataLoader(
        dataset,
        batch_size=per_rank_batch,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=False,
        worker_init_fn=_ignore_sigterm,
        prefetch_factor=4 if workers > 0 else None,
    )
