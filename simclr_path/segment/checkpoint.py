"""Checkpoints of ``segment`` runs: the same atomic writer and safe reader as ``pretrain``'s.

A segment checkpoint holds ``kind`` (:data:`SEGMENT_KIND`), the student ``model``, the EMA
``teacher`` (FixMatch runs), ``optimizer``, ``step``, the resolved ``config`` and the ``meta``
inference needs (see :func:`simclr_path.segment.model.load_segment_run`).
"""

from __future__ import annotations

import os

from simclr_path.engine.checkpoint import load_checkpoint
from simclr_path.errors import SimclrPathError

SEGMENT_CHECKPOINT = "checkpoint.pt"
SEGMENT_KIND = "simclr-path segment"


def read_segment_checkpoint(run: str) -> dict:
    """The checkpoint of the segment run folder (or checkpoint file) ``run``, checked to be one."""
    if os.path.isdir(run):
        path = os.path.join(run, SEGMENT_CHECKPOINT)
        if not os.path.exists(path):
            raise SimclrPathError(f"{run}: run folder has no {SEGMENT_CHECKPOINT}; train it with 'simclr-path segment'")
    elif os.path.exists(run):
        path = run
    else:
        raise SimclrPathError(f"{run}: no such segment run folder or checkpoint")
    ckpt = load_checkpoint(path, encoder_fix="pass the --out folder of a 'simclr-path segment' run (an encoder is "
                                            "what 'segment' trains from: simclr-path segment ENCODER STORES ...)")
    if ckpt.get("kind") != SEGMENT_KIND or "meta" not in ckpt:
        raise SimclrPathError(
            f"{path}: not a 'simclr-path segment' run (a pretraining checkpoint?); pass the --out folder of 'segment'"
        )
    return ckpt
