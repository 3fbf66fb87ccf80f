"""k-center scaling: `select`'s greedy k-center on a million regions, without an N x N matrix.

Times :func:`simclr_path.selection.kcenter.greedy_kcenter` on random float32 features (L2-normalised,
as region features are) for each (N, D, budget, annotated) row, each in a fresh subprocess so its
peak RSS (``resource.getrusage``, the process's largest resident set) is its own. "features MiB" is
the N x D x 4 bytes of the input itself; the rest of the peak is Python, torch and the O(N)
vectors k-center keeps (squared norms, nearest-center distances), never O(N^2).

"seconds" is greedy_kcenter alone (not generating the features); with annotated > 0 it includes
measuring every point's distance to the annotated regions' features (the initial centers).

Usage: python bench/select_scaling.py [--dim 512] [--sizes 100000 1000000] [--budgets 50 200]
                                      [--annotated 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(n: int, dim: int, budget: int, annotated: int, threads: int) -> dict:
    """Run in the subprocess: make the features, time k-center, report peak RSS."""
    import torch

    from simclr_path.selection.kcenter import greedy_kcenter

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    features = torch.empty(n, dim)
    for start in range(0, n, 65536):  # in place, chunk by chunk: no second N x D copy
        block = features[start:start + 65536]
        block.normal_(generator=generator)
        torch.nn.functional.normalize(block, dim=1, out=block)
    centers = torch.nn.functional.normalize(torch.randn(annotated, dim, generator=generator), dim=1) \
        if annotated else None
    started = time.perf_counter()
    order, distances = greedy_kcenter(features, budget, centers)
    seconds = time.perf_counter() - started
    assert len(set(order)) == budget and distances == sorted(distances, reverse=True)
    return {"n": n, "dim": dim, "budget": budget, "annotated": annotated, "seconds": round(seconds, 2),
            "seconds_per_pick": round(seconds / budget, 4),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "features_mib": round(n * dim * 4 / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--annotated", type=int, default=1000,
                        help="Also run the smallest budget with this many annotated regions (0: skip).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=int, nargs=4, metavar=("N", "DIM", "BUDGET", "ANNOTATED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, threads=args.threads)))
        return
    runs = [(n, budget, 0) for n in args.sizes for budget in args.budgets]
    if args.annotated:
        runs += [(n, min(args.budgets), args.annotated) for n in args.sizes]
    print(f"{'N':>9} {'D':>4} {'budget':>6} {'annotated':>9} {'seconds':>8} {'s/pick':>7} {'peak RSS MiB':>12} "
          f"{'features MiB':>12}", flush=True)
    for n, budget, annotated in sorted(runs):
        out = subprocess.run([sys.executable, __file__, "--one", str(n), str(args.dim), str(budget), str(annotated),
                              "--threads", str(args.threads)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['n']:>9} {r['dim']:>4} {r['budget']:>6} {r['annotated']:>9} {r['seconds']:>8.2f} "
              f"{r['seconds_per_pick']:>7.3f} {r['peak_rss_mib']:>12} {r['features_mib']:>12}", flush=True)


if __name__ == "__main__":
    main()
