"""Where a run is, and how that is saved and restored: the training state and checkpoint contents.

A checkpoint holds the model (backbone + head, no wrapper prefixes), optimiser, scheduler, RNG
states, the data position (epoch, batch within the epoch) and the resolved config; see
:mod:`simclr_path.engine.checkpoint` for how it is written.
"""

from __future__ import annotations

import hashlib
import random
import signal
import threading
from dataclasses import dataclass

import torch

from simclr_path.engine.checkpoint import strip_prefixes


@dataclass
class TrainState:
    """Where the run is: completed optimiser steps and the data position of the next batch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    consistent: bool = True  # False while an optimiser step is half-applied


class StopOnSigterm:
    """While active, SIGTERM sets ``requested`` instead of killing the process: the loop finishes its
    step, checkpoints and stops. Entered before the run is set up, so a SIGTERM that arrives while
    the model is built or a checkpoint loaded still ends in a checkpoint, not a lost run."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def seed_this_rank(seed: int, rank: int, step: int = 0) -> None:
    """Give rank ``rank`` its own model RNG stream (dropout, stochastic depth), so masks do not repeat
    across ranks; rank 0 keeps the stream of a single-process run. The data order is unaffected:
    the sampler and the views have seeds of their own."""
    if rank:
        # hashed: torch's CPU generator keeps only 32 bits of a seed, so arithmetic offsets can collide
        digest = hashlib.blake2b(f"model:{seed}:{rank}:{step}".encode(), digest_size=8).digest()
        torch.manual_seed(int.from_bytes(digest, "little"))


def rng_state(device: torch.device) -> dict:
    """This process's torch RNG, and its own GPU's (never the other GPUs it may see)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def checkpoint_contents(model, optimizer, scheduler, state: TrainState, config: dict, backbone: str,
                        rank_rng: list[dict], extra: dict) -> dict:
    """Everything a resumed run needs, as a dict ``torch.load(weights_only=True)`` can read.

    ``rank_rng`` is :func:`rng_state` of every rank, in rank order.
    """
    return {
        "model": strip_prefixes(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "rng": {
            "torch": rank_rng[0]["torch"],
            "cuda": [] if rank_rng[0]["cuda"] is None else [rank_rng[0]["cuda"]],
            "python": random.getstate(),
            "per_rank": rank_rng,
        },
        "config": _plain(config),
        "backbone": backbone,
        **extra,
    }


def saved_rng_for(rng: dict, rank: int, world: int, device_index: int | None) -> tuple[object, object] | None:
    """(torch state, GPU state or None) this rank should restore, or None when the checkpoint has none
    for it (it was written by a different number of processes, and this is not rank 0).

    Checkpoints from before per-rank states kept ``cuda`` as the states of *every* visible GPU; only
    this rank's GPU is taken from it, so a machine with fewer GPUs can resume.
    """
    per_rank = rng.get("per_rank")
    if per_rank and len(per_rank) == world:
        return per_rank[rank]["torch"], per_rank[rank]["cuda"]
    if rank != 0:
        return None
    cuda = rng.get("cuda") or []
    index = device_index or 0
    return rng["torch"], (cuda[index] if index < len(cuda) else (cuda[0] if len(cuda) == 1 else None))


def optimizer_name(optimizer) -> str:
    """``lars`` or ``sgd``: the ``optim.optimizer`` setting that built ``optimizer``."""
    return "sgd" if type(optimizer) is torch.optim.SGD else "lars"


def restore_checkpoint(ckpt: dict, model, optimizer, scheduler, rank: int = 0, world: int = 1,
                       device: torch.device = torch.device("cpu"), seed: int = 0) -> TrainState:
    """Load a checkpoint's model, optimiser, scheduler and RNG; returns the state to go on from.

    Each rank restores its own RNG (and only its own GPU's); a rank the checkpoint has no state for
    (a different number of processes) is seeded from (seed, rank, step) instead.

    The optimiser's state (momentum buffers) comes from the checkpoint (unless the optimiser itself
    changed), its settings (weight decay, LARS adaptation, momentum, trust coefficient) from this
    run's config, and the learning rate from the schedule at the checkpoint's step: torch's
    ``load_state_dict`` would otherwise bring back the old settings and silently ignore an allowed
    change (or keep a pre-fix ``always_adapt``).
    """
    model.load_state_dict(ckpt["model"])
    saved_optimizer = (ckpt.get("config") or {}).get("optim", {}).get("optimizer", "lars")  # older runs: LARS
    if saved_optimizer == optimizer_name(optimizer):
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(optimizer.param_groups, settings):
            params = group["params"]
            group.clear()
            group.update(own, params=params)
    # else (an allowed --optimizer change): LARS keeps trust-scaled steps in its momentum, SGD raw
    # gradients, so the buffers would mean something else; the new optimiser starts without momentum
    scheduler.step_update(num_updates=ckpt["step"])
    saved = saved_rng_for(ckpt["rng"], rank, world, device.index if device.type == "cuda" else None)
    if saved is None:
        seed_this_rank(seed, rank, ckpt["step"])
    else:
        torch.set_rng_state(saved[0])
        if saved[1] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(saved[1], device)
    random.setstate(_tuples(ckpt["rng"]["python"]))
    return TrainState(step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"])


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
