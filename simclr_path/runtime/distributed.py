"""Distributed set-up in one place: rank helpers, process-group start, and launching.

Three ways a run becomes distributed, all through torch.distributed:

- ``simclr-path pretrain --gpus 8`` (or ``--device cpu --nproc 2``) on one machine starts the
  processes with torch's elastic launcher (``torch.distributed.launcher.elastic_launch``, what
  ``torchrun --standalone`` uses), NCCL on CUDA, gloo on CPU;
- under ``torchrun`` (any number of nodes) the environment already names RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and each process joins the group;
- under SLURM's ``srun`` (one task per GPU) the same is read from SLURM_PROCID,
  SLURM_STEP_NUM_TASKS, SLURM_LOCALID, with the first node of the job as the master.
"""

from __future__ import annotations

import logging
import os
import subprocess
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist

from simclr_path.errors import SimclrPathError

#: How long a collective may wait for a missing rank before the run fails instead of hanging.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def local_cuda_device() -> torch.device:
    """The GPU of this process: ``cuda:<local rank>`` when the node's GPUs are all visible, else the
    one it is given. Under SLURM with ``--gpus-per-task=1`` or GPU binding, each task sees a single
    GPU (as ``cuda:0``) and its local rank may be 3: ``cuda:3`` does not exist there."""
    visible, local = torch.cuda.device_count(), local_rank()
    if visible < 1:
        raise SimclrPathError("no CUDA GPU is visible to this process; check CUDA_VISIBLE_DEVICES or use --device cpu")
    if visible == 1:
        return torch.device("cuda", 0)
    if local < visible:
        return torch.device("cuda", local)
    raise SimclrPathError(
        f"local rank {local} but only {visible} GPUs are visible to it: two ranks would share a GPU; start one "
        "process per GPU (--ntasks-per-node = GPUs per node) or bind one GPU per task (--gpus-per-task=1)"
    )


def processes_on_node() -> int:
    """Training processes on this machine: torchrun's LOCAL_WORLD_SIZE, else SLURM's tasks per node."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = os.environ.get(name)
        if value:
            try:
                return max(1, int(value.split("(")[0].split(",")[0]))  # SLURM writes "8(x2)" or "8,8"
            except ValueError:
                continue
    return 1


def all_min(value: int, device: torch.device) -> int:
    """The smallest of an integer over all ranks (the same answer on every rank)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_gather(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_mean(value: float, device: torch.device) -> float:
    """The mean of a scalar over all ranks (the same answer on every rank)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``tensor`` over all ranks (in place when distributed; one collective)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def launched_externally() -> bool:
    """True under torchrun/elastic (RANK and WORLD_SIZE set) or inside a multi-task srun step."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]) > 1
    # SLURM_STEP_NUM_TASKS exists inside an srun step only, not in the batch script around it
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def _slurm_env() -> None:
    """Fill torch's variables from SLURM's for a plain ``srun`` (one task per process)."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_STEP_NUM_TASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError, TypeError):
            raise SimclrPathError(
                "running under srun, but the master node is unknown; export MASTER_ADDR=<first node> "
                "(and MASTER_PORT) in the job script"
            ) from None
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))


def init_process_group(device_type: str) -> torch.device:
    """Join the process group named by the environment; returns this process's device."""
    if "RANK" not in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ:
        _slurm_env()
    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device("cpu")
    if device_type == "cuda":
        device = local_cuda_device()
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device_type == "cuda" else None)
    return device


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_local(nproc: int, entrypoint, *args):
    """Run ``entrypoint(*args)`` in ``nproc`` processes on this machine with the elastic launcher.

    Returns rank 0's return value. A rank that fails stops the others (the launcher terminates the
    group) and its one-line error is raised here as :class:`SimclrPathError`.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"simclr-path-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    # The launcher's own logging (rendezvous, SIGTERM to surviving ranks, failure tables) would
    # bury the one line that matters; the failure itself is reported below.
    quiet = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    previous = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        raise SimclrPathError(_first_failure(exc)) from None
    finally:
        for logger, level in zip(quiet, previous):
            logger.setLevel(level)
    return results[0]


def _first_failure(exc) -> str:
    rank_, failure = exc.get_first_failure()
    message = getattr(failure, "message", "") or ""
    if isinstance(message, dict):  # the error file's {"message": ..., "extraInfo": {...}}
        message = message.get("message", "")
    message = str(message)
    for prefix in ("SimclrPathError: ", "SlideError: "):
        if message.startswith(prefix):
            return message[len(prefix):].splitlines()[0]
    exit_code = getattr(failure, "exitcode", "?")
    detail = message.splitlines()[0] if message and message != "<NONE>" else f"exit code {exit_code}"
    return f"rank {rank_} of the run died ({detail}); the other ranks were stopped - see the log above"
