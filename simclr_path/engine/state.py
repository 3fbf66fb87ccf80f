"""Where a run is, and how that is saved and restored: the training state and checkpoint contents.

A checkpoint holds the model (backbone + head, no wrapper prefixes), optimiser, scheduler, RNG
states, the data position (epoch, batch within the epoch) and the resolved config; see
:mod:`simclr_path.engine.checkpoint` for how it is written.
"""

from __future__ import annotations

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


def checkpoint_contents(model, optimizer, scheduler, state: TrainState, config: dict, backbone: str,
                        extra: dict) -> dict:
    """Everything a resumed run needs, as a dict ``torch.load(weights_only=True)`` can read."""
    return {
        "model": strip_prefixes(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        },
        "config": _plain(config),
        "backbone": backbone,
        **extra,
    }


def restore_checkpoint(ckpt: dict, model, optimizer, scheduler) -> TrainState:
    """Load a checkpoint's model, optimiser, scheduler and RNG; returns the state to go on from."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
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
