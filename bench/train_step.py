"""SimCLR step throughput vs a bare backbone forward + backward on the same 2B images.

"SimCLR step" is what `simclr-path pretrain` does per batch: normalise uint8 views, backbone +
projection head, NT-Xent (fp32), backward, LARS step, scheduler update. "Bare" is the backbone
alone on the same 2B images with a trivial loss and a plain SGD step. The ratio is the overhead of
SimCLR itself (head, loss, LARS). Views/s = images (2 per patch) per second; median of timed steps.

"pretrain end to end" (on unless ``--no-end-to-end``) runs ``pretrain()`` itself - the run-long
DataLoader with ``--workers`` augmenting views from a real store, and the training loop at its own
sync cadence - for the same model and batch, and reports its views/s after warm-up (from
metrics.jsonl) against the SimCLR step on preloaded views: the loader keeps up when the ratio is
close to 1 (target >= 0.95 with 2 workers). A shared machine's speed drifts by 10-20% within
minutes, so ``--repeats`` pairs (a SimCLR-step timing, then an end-to-end run) are measured and
the median of their ratios is reported, with the range.

OpenMP's wait policy is PASSIVE, as ``simclr-path`` sets it; ``OMP_WAIT_POLICY=ACTIVE python
bench/train_step.py`` measures libgomp's spinning default instead (the header prints which).

Usage: python bench/train_step.py [--backbone resnet18] [--batch 32] [--image-size 96]
       [--device cpu|cuda] [--amp] [--channels-last] [--compile] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the simclr-path command sets it (cli/main.py)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simclr_path.losses import NTXentLoss  # noqa: E402
from simclr_path.models import SimCLRModel, create_backbone  # noqa: E402
from simclr_path.optim import build_optimizer, build_scheduler  # noqa: E402
from simclr_path.engine.gradients import cached_loss_and_backward, choose_chunk  # noqa: E402
from simclr_path.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(steps_to_time: list, steps: int, warmup: int, device) -> list[float]:
    """Median seconds per call of each step function, calls interleaved so drift hits all alike."""
    for _ in range(warmup):
        for step in steps_to_time:
            step()
    sync(device)
    times = [[] for _ in steps_to_time]
    for _ in range(steps):
        for i, step in enumerate(steps_to_time):
            start = time.perf_counter()
            step()
            sync(device)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch", type=int, default=32, help="patches per step (2x views)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-gain", action="store_true",
                        help="also time the SimCLR step torch.compile'd and print compiled / eager views/s")
    parser.add_argument("--chunk", default=None, help="gradient cache: views per chunk or 'auto' (CUDA)")
    parser.add_argument("--skip-bare", action="store_true", help="only the SimCLR step (e.g. batches too big for one pass)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                        help="skip the pretrain() run (loader + loop)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the end-to-end run")
    parser.add_argument("--augment", choices=["auto", "device", "cpu"], default="auto",
                        help="where the end-to-end run makes its views (pretrain --augment)")
    parser.add_argument("--store", default=None, help="store for the end-to-end run [default: CMU-1-Small-Region]")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="(SimCLR step, end-to-end run) pairs; the median ratio is reported")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    views_u8 = torch.randint(0, 256, (2 * args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
    views_u8 = views_u8.to(device)

    simclr = SimCLRModel(args.backbone).to(device).to(memory_format=fmt)
    optimizer = build_optimizer(simclr, lr=0.3)
    scheduler = build_scheduler(optimizer, total_steps=10_000, warmup_steps=100)
    loss_fn = NTXentLoss(0.1)
    chunk = args.chunk
    if chunk == "auto":
        chunk = choose_chunk(simclr, args.image_size, 2 * args.batch, device, args.amp)
    elif chunk is not None:
        chunk = int(chunk)
    state = {"step": 0, "fwd": torch.compile(simclr) if args.compile else simclr}

    def simclr_step():
        x = normalize(views_u8, IMAGENET_MEAN, IMAGENET_STD).contiguous(memory_format=fmt)
        optimizer.zero_grad(set_to_none=True)
        if chunk:
            cached_loss_and_backward(state["fwd"], x, loss_fn, args.amp, chunk)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                z = state["fwd"](x)
            z0, z1 = z.float().chunk(2)
            loss_fn(z0, z1).backward()
        optimizer.step()
        state["step"] += 1
        scheduler.step_update(state["step"])

    bare = create_backbone(args.backbone).to(device).to(memory_format=fmt)
    bare_opt = torch.optim.SGD(bare.parameters(), lr=0.01)
    bare_fwd = torch.compile(bare) if args.compile else bare

    def bare_step():
        x = normalize(views_u8, IMAGENET_MEAN, IMAGENET_STD).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = bare_fwd(x).float().pow(2).mean()
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.skip_bare:
        (t_simclr,), t_bare = time_steps([simclr_step], args.steps, args.warmup, device), None
    else:
        t_simclr, t_bare = time_steps([simclr_step, bare_step], args.steps, args.warmup, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    n = 2 * args.batch
    print(f"\n{args.backbone} @ {args.image_size}px, batch {args.batch} ({n} views), device {device}, amp={args.amp}, "
          f"channels_last={args.channels_last}, compile={args.compile}, chunk={chunk}, threads={torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"{'step':14} | {'ms/step':>8} | {'views/s':>8}")
    print("-" * 37)
    print(f"{'SimCLR':14} | {t_simclr * 1e3:8.1f} | {n / t_simclr:8.1f}")
    if t_bare is not None:
        print(f"{'bare backbone':14} | {t_bare * 1e3:8.1f} | {n / t_bare:8.1f}")
        print(f"\nSimCLR / bare throughput: {t_bare / t_simclr:.3f}x")
    if device.type == "cuda":
        print(f"SimCLR peak GPU memory {peak:.2f} GiB")
    if args.compile_gain and not args.compile:
        state["fwd"] = torch.compile(simclr)
        (t_compiled,) = time_steps([simclr_step], args.steps, max(args.warmup, 3), device)
        state["fwd"] = simclr
        print(f"torch.compile on the SimCLR step: {n / t_compiled:.1f} views/s compiled vs {n / t_simclr:.1f} eager: "
              f"{t_simclr / t_compiled:.3f}x")
    if args.end_to_end:
        # This machine's speed drifts by 10-20% over minutes (shared hosts), so each end-to-end run is
        # paired with a SimCLR-step timing taken just before it, and the ratio is the median over pairs.
        print(f"\npretrain end to end ({args.workers} loader workers, --augment {args.augment}, real store) vs the SimCLR "
              "step timed just before it")
        print(f"{'pair':5} | {'step views/s':>12} | {'e2e views/s':>11} | {'ratio':>6}")
        print("-" * 45)
        ratios = []
        with tempfile.TemporaryDirectory() as tmp:
            if args.store is None:
                args.store = default_store(tmp)  # tiled once for every pair
            for pair in range(args.repeats):
                (t_step,) = time_steps([simclr_step], args.steps, 1, device)
                rate = end_to_end(args)
                ratios.append(rate / (n / t_step))
                print(f"{pair + 1:5} | {n / t_step:12.1f} | {rate:11.1f} | {ratios[-1]:6.3f}")
        print(f"\npretrain end to end (--augment {args.augment}) / SimCLR step: median {statistics.median(ratios):.3f}x over {len(ratios)} pairs "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


def end_to_end(args) -> float:
    """Views/s of pretrain() itself (loader + loop) after warm-up, same model and batch."""
    import json

    from simclr_path.engine.config import PretrainConfig
    from simclr_path.engine.pretrain import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        cfg = PretrainConfig()
        cfg.model.backbone, cfg.model.channels_last, cfg.model.compile = args.backbone, args.channels_last, args.compile
        cfg.views.image_size = args.image_size
        cfg.optim.global_batch, cfg.optim.epochs = args.batch, 10_000
        cfg.optim.max_steps = args.warmup + args.steps
        cfg.run.device, cfg.run.workers, cfg.run.bf16 = args.device, args.workers, args.amp
        cfg.run.augment = args.augment
        cfg.run.log_every, cfg.run.checkpoint_every = 5, 10**9  # the loop's own sync cadence
        pretrain([args.store], f"{tmp}/run", cfg, progress=False)
        with open(f"{tmp}/run/metrics.jsonl") as fh:
            records = [json.loads(line) for line in fh]
        records = [r for r in records if "img_per_s" in r]
        # each record's rate covers the steps since the previous record; keep intervals after warm-up
        intervals = [(b["step"] - a["step"], b["img_per_s"]) for a, b in zip(records, records[1:])
                     if a["step"] >= args.warmup]
        views = sum(steps for steps, _ in intervals) * 2 * args.batch
        return views / sum(steps * 2 * args.batch / rate for steps, rate in intervals)


def default_store(tmp: str) -> str:
    from simclr_path.wsi.grid import TileSpec
    from simclr_path.wsi.tiler import tile_slides

    slide = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
    out = f"{tmp}/e2e.h5"
    tile_slides([str(slide)], out, TileSpec(target_mpp=0.5, patch_size=256, min_tissue=0.1), workers=0)
    return out


if __name__ == "__main__":
    main()
