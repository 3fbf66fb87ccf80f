"""Data loading for pretraining: one sampler and one DataLoader for the whole run.

The order of patches in an epoch depends only on ``(seed, epoch)`` (``DistributedSampler``'s
shuffle) and each rank takes its own slice, cut to whole batches. :class:`RunSampler` chains the
epochs, yielding ``(epoch, index)`` pairs, so one DataLoader iterator - and its worker processes,
with their open HDF5 files - lasts the whole run instead of being rebuilt every epoch, while each
item still knows its epoch. A run resumed mid-epoch starts the sampler at the next batch it has not
trained on, so it sees exactly the batches an uninterrupted run would.

Workers collate one ``(2B, S, S, 3)`` uint8 tensor per batch (first views, then second views),
which the loader pins; the training step moves it to the device and permutes it to NCHW there.
With ``--augment device`` they collate the decoded patches alone, ``(B, P, P, 3)`` uint8, and the
training step makes both views on the device (:mod:`simclr_path.data.device_views`).
"""

from __future__ import annotations

import contextlib
import shutil
import signal

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from simclr_path.data.datasets import PatchDataset, TwoViewDataset
from simclr_path.errors import SimclrPathError
from simclr_path.runtime.console import log
from simclr_path.runtime.distributed import processes_on_node

#: Batches each worker prepares ahead, when shared memory allows.
PREFETCH_FACTOR = 4


class RunSampler(Sampler):
    """``(epoch, index)`` for every sample this rank trains on, from a start position to the last epoch.

    The order of an epoch is ``DistributedSampler``'s (shuffle, drop_last): one permutation from
    ``seed + epoch``, cut to a multiple of the ranks, every ``num_replicas``-th index from ``rank``.
    It is held as one array (int32 below 2**31 patches), never as Python lists: at 10**8 patches the
    sampler peaks at about 0.4 GB instead of several GB (bench/sampler_memory.py).

    Args:
        num_items: dataset length.
        num_replicas, rank: the process group's size and this process's rank.
        seed: shuffle seed shared by all ranks.
        per_rank_batch: samples per step on this rank; each epoch is cut to whole batches.
        epochs: the run's number of epochs.
        start_epoch, start_batch: where to begin (a resumed run: the next batch not yet trained on).
    """

    def __init__(self, num_items: int, num_replicas: int, rank: int, seed: int, per_rank_batch: int, epochs: int,
                 start_epoch: int = 0, start_batch: int = 0):
        self.num_items, self.num_replicas, self.rank, self.seed = num_items, num_replicas, rank, seed
        # DistributedSampler(drop_last=True): the per-rank length, the total cut to a multiple of the ranks
        self.per_rank = num_items // num_replicas
        self.per_rank_batch = per_rank_batch
        self.steps_per_epoch = self.per_rank // per_rank_batch
        self.epochs, self.start_epoch, self.start_batch = epochs, start_epoch, start_batch

    def order(self, epoch: int) -> np.ndarray:
        """This rank's patch indices of ``epoch``, in training order (whole batches only)."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)  # DistributedSampler's; int32 draws the same permutation
        dtype = torch.int32 if self.num_items < 2**31 else torch.int64
        permutation = torch.randperm(self.num_items, generator=generator, dtype=dtype).numpy()
        mine = permutation[self.rank: self.per_rank * self.num_replicas: self.num_replicas]
        return mine[: self.steps_per_epoch * self.per_rank_batch]

    def __iter__(self):
        for epoch in range(self.start_epoch, self.epochs):
            skip = self.start_batch * self.per_rank_batch if epoch == self.start_epoch else 0
            order = self.order(epoch)[skip:]
            for start in range(0, len(order), 65_536):  # Python ints a slice at a time
                for index in order[start: start + 65_536].tolist():
                    yield epoch, index

    def __len__(self) -> int:
        epochs = max(0, self.epochs - self.start_epoch)
        return (epochs * self.steps_per_epoch - (self.start_batch if epochs else 0)) * self.per_rank_batch


def collate_views(items: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """B pairs of (S, S, 3) views -> one (2B, S, S, 3) uint8 tensor: all first views, then all second."""
    batch = len(items)
    out = torch.empty((2 * batch, *items[0][0].shape), dtype=torch.uint8)
    for i, (view0, view1) in enumerate(items):
        out[i] = view0
        out[batch + i] = view1
    return out


def collate_patches(items: list[torch.Tensor]) -> torch.Tensor:
    """B decoded patches (P, P, 3) -> one (B, P, P, 3) uint8 tensor, for the views made on the device."""
    return torch.stack(items)


def worker_init(worker_id: int) -> None:
    """A training loader's ``worker_init_fn`` (``pretrain``'s and ``segment``'s): one OpenCV thread per
    worker (the workers are the parallelism). Workers leave SIGTERM to the training process, which
    checkpoints and then ends them (a scheduler's ``scancel`` signals every process of the job,
    workers included); a worker that died of it would end the run in a DataLoader traceback."""
    if cv2.getNumThreads() != 1:  # a spawned/forkserver worker; a forked one inherited 1 (see run_batches)
        cv2.setNumThreads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shared_memory_needed(per_rank_batch: int, image_size: int, workers: int, prefetch: int,
                         processes_on_node: int = 1, patch_side: int | None = None) -> int:
    """Bytes of shared memory (``/dev/shm``) the loaders of this node hold: every worker's batches in
    flight, for every training process of the node. A batch is ``(2B, S, S, 3)`` uint8 views, or, with
    ``patch_side`` (views made on the device), ``(B, P, P, 3)`` uint8 patches."""
    batch = per_rank_batch * patch_side ** 2 * 3 if patch_side else 2 * per_rank_batch * image_size ** 2 * 3
    return processes_on_node * workers * (prefetch + 1) * batch


def choose_prefetch(per_rank_batch: int, image_size: int, workers: int, shm_path: str = "/dev/shm",
                    patch_side: int | None = None) -> int | None:
    """Batches each worker prepares ahead: :data:`PREFETCH_FACTOR`, or fewer when ``shm_path`` is too
    small (a note says so); a one-line error with the size needed when even one does not fit.
    ``patch_side``: the loader carries whole decoded patches of that side (``--augment device``).

    Docker's default /dev/shm is 64 MB; a loader that outgrows it dies with a bus error mid-run.
    """
    if workers == 0:
        return None
    try:
        free = shutil.disk_usage(shm_path).free
    except OSError:
        return PREFETCH_FACTOR  # no /dev/shm to measure (not Linux): torch picks its own way
    node = processes_on_node()
    for prefetch in range(PREFETCH_FACTOR, 0, -1):
        need = shared_memory_needed(per_rank_batch, image_size, workers, prefetch, node, patch_side)
        if need <= 0.8 * free:
            if prefetch < PREFETCH_FACTOR:
                log(f"note: {shm_path} has {free / 2**30:.2f} GiB free; loader workers prefetch {prefetch} "
                    f"batch(es) instead of {PREFETCH_FACTOR}")
            return prefetch
    need = shared_memory_needed(per_rank_batch, image_size, workers, 1, node, patch_side)
    carried = (f"batches of {per_rank_batch} patches of {patch_side} px" if patch_side
               else f"batches of {2 * per_rank_batch} views of {image_size} px")
    raise SimclrPathError(
        f"{shm_path}: the data loader needs about {need / 2**30 * 1.25:.2f} GiB of shared memory ({node} process(es) "
        f"x {workers} workers x {carried}) but {free / 2**30:.2f} GiB "
        "is free; raise it (docker run --shm-size=16g, or a memory-backed emptyDir on Kubernetes) or lower "
        "--workers or --batch"
    )


def build_loader(dataset: TwoViewDataset | PatchDataset, sampler: RunSampler, workers: int, pin_memory: bool,
                 prefetch: int | None = PREFETCH_FACTOR) -> DataLoader:
    """The run's DataLoader: batches of ``sampler.per_rank_batch`` pairs as (2B, S, S, 3) uint8, or of
    decoded patches as (B, P, P, 3) uint8 from a :class:`PatchDataset`."""
    generator = torch.Generator()
    generator.manual_seed(dataset.seed * 100_003 + sampler.start_epoch)  # worker seeds, not the global RNG
    return DataLoader(
        dataset,
        batch_size=sampler.per_rank_batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_patches if isinstance(dataset, PatchDataset) else collate_views,
        drop_last=True,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=worker_init,
        prefetch_factor=(prefetch or PREFETCH_FACTOR) if workers > 0 else None,
    )


@contextlib.contextmanager
def run_batches(loader: DataLoader):
    """Iterate ``loader`` once for the whole run; its workers are ended when the block exits.

    Explicitly, also on an exception: the workers ignore SIGTERM (see :func:`worker_init`), so
    one left to the garbage collector - kept alive by a traceback, say - would hold up the exit of
    the process that started it.
    """
    # Forked workers inherit OpenCV's thread count: set 1 while they start (calling cv2.setNumThreads
    # inside a forked child can deadlock on the parent's thread pool), then give the trainer its own back.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        batches = iter(loader)
    finally:
        cv2.setNumThreads(threads)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()

