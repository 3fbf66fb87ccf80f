"""Choosing how ``pretrain`` runs: one process, N local processes, or one rank of an external launch.

- Under ``torchrun`` or ``srun`` (the environment names the ranks): join the group and train.
- ``nproc > 1``: check everything once here, then start ``nproc`` processes through torch's
  elastic launcher; each joins the group and trains. Rank 0's summary comes back.
- Otherwise: train in this process.
"""

from __future__ import annotations

from torch.distributed.elastic.multiprocessing.errors import record

from simclr_path.engine.config import PretrainConfig
from simclr_path.engine.pretrain import preflight, pretrain
from simclr_path.errors import SimclrPathError
from simclr_path.runtime import distributed
from simclr_path.runtime.device import resolve_device


def run_pretrain(stores: list[str], out: str, cfg: PretrainConfig, nproc: int = 1, progress: bool = True) -> dict | None:
    """Pretrain in the way the environment and ``nproc`` ask for; returns the summary on rank 0."""
    if nproc < 1:
        raise SimclrPathError(f"--nproc/--gpus must be >= 1, got {nproc}")
    device = resolve_device(cfg.run.device)
    if distributed.launched_externally():
        if nproc > 1:
            raise SimclrPathError("already launched by torchrun/srun: drop --gpus/--nproc (the launcher sets the ranks)")
        return _as_rank(stores, out, cfg, device.type, progress)
    if nproc == 1:
        return pretrain(stores, out, cfg, progress)
    if device.type == "cuda":
        import torch

        available = torch.cuda.device_count()
        if nproc > available:
            raise SimclrPathError(f"--gpus {nproc} asked for, but {available} CUDA GPU(s) are visible")
    preflight(stores, cfg, nproc)
    return distributed.launch_local(nproc, _worker, stores, out, cfg.to_dict(), device.type, progress)


def _as_rank(stores, out, cfg: PretrainConfig, device_type: str, progress: bool):
    distributed.init_process_group(device_type)
    try:
        summary = pretrain(stores, out, cfg, progress)
        distributed.barrier()
        return summary if distributed.is_main() else None
    finally:
        distributed.destroy_process_group()


@record
def _worker(stores, out, cfg_dict: dict, device_type: str, progress: bool):
    """One rank started by :func:`run_pretrain` (top level, so the launcher can spawn it)."""
    cfg = PretrainConfig.from_dict(cfg_dict)
    return _as_rank(stores, out, cfg, device_type, progress)
