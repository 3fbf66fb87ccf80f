"""Distributed scaling on CPU ranks, and the cost of the gradient cache.

1. Weak scaling: 1 vs 2 gloo ranks (started by torch's elastic launcher, one thread each), the
   same per-rank batch, the full SimCLR step (DDP, embeddings gathered with gradients, LARS).
   Efficiency = views/s with 2 ranks / (2 x views/s with 1 rank).
2. Gradient cache: one process, the same batch, plain step vs chunks of B/2 and B/4 views:
   throughput ratio (the cache recomputes each forward, so ~1.3x the work of a plain step).

Synthetic views (no data loading), median step time after warm-up.
Usage: python bench/scaling.py [--backbone resnet18] [--batch 32] [--image-size 64] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simclr_path.runtime import distributed  # noqa: E402
from simclr_path.losses import NTXentLoss  # noqa: E402
from simclr_path.models import SimCLRModel  # noqa: E402
from simclr_path.optim import build_optimizer  # noqa: E402
from simclr_path.engine.gradients import cached_loss_and_backward, loss_and_backward  # noqa: E402


def timed_steps(model, views, chunk, steps, warmup):
    optimizer = build_optimizer(model, lr=0.1)
    loss_fn = NTXentLoss(0.1, gather_distributed=True)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if chunk:
            cached_loss_and_backward(model, views, loss_fn, False, chunk)
        else:
            loss_and_backward(model, views, loss_fn, False)
        optimizer.step()
        distributed.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_worker(backbone, per_rank_batch, image_size, steps, warmup):
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    distributed.init_process_group("cpu")
    torch.manual_seed(distributed.rank())
    model = SimCLRModel(backbone)
    if distributed.world_size() > 1:
        model = DistributedDataParallel(model)
    views = torch.randn(2 * per_rank_batch, 3, image_size, image_size)
    seconds = timed_steps(model, views, None, steps, warmup)
    world = distributed.world_size()
    distributed.destroy_process_group()
    return 2 * per_rank_batch * world / seconds  # views/s over all ranks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch", type=int, default=32, help="patches per rank (weak scaling) / per step (cache)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    rates = {}
    for nproc in (1, 2):
        rates[nproc] = distributed.launch_local(nproc, rank_worker, args.backbone, args.batch, args.image_size,
                                                args.steps, args.warmup)
    print(f"\nWeak scaling, {args.backbone} @ {args.image_size}px, {args.batch} patches per rank, 1 thread per rank")
    print(f"{'ranks':>5} | {'global batch':>12} | {'views/s':>8} | efficiency")
    print("-" * 46)
    for nproc in (1, 2):
        eff = rates[nproc] / (nproc * rates[1])
        print(f"{nproc:>5} | {nproc * args.batch:>12} | {rates[nproc]:8.1f} | {eff:8.2f}")

    torch.manual_seed(0)
    model = SimCLRModel(args.backbone)
    views = torch.randn(2 * args.batch, 3, args.image_size, args.image_size)
    rows = []
    base = None
    for chunk in (None, args.batch, args.batch // 2):
        seconds = timed_steps(model, views, chunk, args.steps, args.warmup)
        rate = 2 * args.batch / seconds
        base = base or rate
        rows.append((f"chunks of {chunk} views" if chunk else "no cache", rate, rate / base))
    print(f"\nGradient cache, batch {args.batch} ({2 * args.batch} views), one process, {torch.get_num_threads()} threads")
    print(f"{'step':22} | {'views/s':>8} | vs no cache")
    print("-" * 46)
    for name, rate, ratio in rows:
        print(f"{name:22} | {rate:8.1f} | {ratio:10.2f}x")


if __name__ == "__main__":
    main()
