"""Peak memory of one epoch's sample order at 10**8 patches: RunSampler's array vs the former Python lists.

``RunSampler.order`` (simclr_path/data/loader.py) draws the epoch's permutation as one int32 array
and slices this rank's share as a view; its ``__iter__`` turns 65,536 indices at a time into Python
ints. The former code was ``list(DistributedSampler)[:n]``: a ``tolist()`` of the permutation, the
padded/cut list, the rank's slice and the whole-batch slice - several lists of Python ints (8-byte
pointers to 28-byte int objects) alive at once.

Each measurement runs in a fresh subprocess: peak resident memory (``ru_maxrss``) after building
the order and taking the first batch from the iterator, minus the resident memory after the imports.

Usage: python bench/sampler_memory.py [--patches 100000000] [--lists-patches 10000000] [--world 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import itertools, json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from torch.utils.data import DistributedSampler
from simclr_path.data.loader import RunSampler

n, world, how = {n}, {world}, {how!r}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if how == "arrays":
    sampler = RunSampler(n, world, 0, seed=0, per_rank_batch=256, epochs=1)
    first = list(itertools.islice(iter(sampler), 256))
else:  # the former RunSampler.order
    order = DistributedSampler(range(n), num_replicas=world, rank=0, shuffle=True, seed=0, drop_last=True)
    order.set_epoch(0)
    steps = len(order) // 256
    first = list(enumerate(list(order)[: steps * 256]))[:256]
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"how": how, "patches": n, "peak_mib": (peak - base) / 1024, "seconds": seconds}}))
"""


def measure(how: str, n: int, world: int) -> dict:
    code = CHILD.format(root=str(ROOT), n=n, world=world, how=how)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=10**8, help="store size for the array sampler")
    parser.add_argument("--lists-patches", type=int, default=10**7,
                        help="store size for the former list code (0: skip; it needs ~60 bytes per patch)")
    parser.add_argument("--world", type=int, default=1, help="ranks (rank 0 is measured)")
    args = parser.parse_args()
    rows = [measure("arrays", args.patches, args.world)]
    if args.lists_patches:
        rows.append(measure("lists", args.lists_patches, args.world))
    print(f"\nOne epoch's order on rank 0 of {args.world}, peak RSS above the imports (fresh process each)")
    print(f"{'order held as':22} | {'patches':>12} | {'peak MiB':>9} | {'bytes/patch':>11} | {'seconds':>7}")
    print("-" * 72)
    for r in rows:
        name = "int32 array (now)" if r["how"] == "arrays" else "Python lists (before)"
        print(f"{name:22} | {r['patches']:12,} | {r['peak_mib']:9.0f} | {r['peak_mib'] * 2**20 / r['patches']:11.1f} "
              f"| {r['seconds']:7.1f}")


if __name__ == "__main__":
    main()
