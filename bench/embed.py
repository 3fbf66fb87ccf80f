"""Embedding benchmark: `simclr-path embed` memory is flat in the number of patches.

Builds (once, cached in bench/_work/embed/) patch stores of N and FACTOR x N patches from the PCam
JPEGs (their bytes repeated to reach the count; slides of --per-slide patches, so the bigger store
has FACTOR x the slides) and a random-init timm encoder in the export format. Then, for each store,
runs `simclr-path embed` end to end in a fresh subprocess (CPU), and reruns it (every slide
already embedded: skipped without reading pixels). Peak RSS is the subprocess's own rusage from
os.wait4: the largest resident set of the embed process and of its loader workers.

The table's "features MiB" is N x D x 4 bytes: what the previous, in-memory `embed` held (twice,
while concatenating) before writing features.h5.

"seconds (wall)" includes the subprocess's start-up (imports); "seconds (in embed)" and
patches/s are embed's own (its JSON "seconds").

Usage: python bench/embed.py [--patches 5000] [--factor 10] [--per-slide 1000] [--model resnet18]
                             [--input-size 32] [--batch 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work" / "embed"
PCAM = ROOT.parent / "shared" / "data" / "patches" / "pcam_ai4all"

from simclr_path.downstream.encoder import ENCODER_FORMAT  # noqa: E402
from simclr_path.store import StoreWriter  # noqa: E402
from simclr_path.store.codecs import create_pixel_dataset, encode_jpeg, write_patches  # noqa: E402

CLI = "from simclr_path.cli.main import cli; cli(prog_name='simclr-path')"


def source_jpegs(limit: int = 3000) -> list[np.ndarray]:
    """PCam's 96 px JPEG bytes as stored (or random images if PCam is absent)."""
    files = sorted(PCAM.glob("valid/*/*.jpg"))[:limit] if PCAM.exists() else []
    if files:
        return [np.fromfile(str(p), dtype=np.uint8) for p in files]
    rng = np.random.default_rng(0)
    return [encode_jpeg(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), 90) for _ in range(256)]


def build_store(path: Path, patches: int, per_slide: int, jpegs: list[np.ndarray]) -> None:
    if path.exists():
        return
    tmp = path.with_name(path.stem + "-partial.h5")
    if tmp.exists():
        tmp.unlink()
    spec = {"target_mpp": 0.97, "magnification": float("nan"), "patch_size": 96, "stride": float("nan"),
            "min_tissue": 0.0, "codec": "jpeg", "jpeg_quality": 90}
    writer = StoreWriter(str(tmp), spec)
    try:
        for number, first in enumerate(range(0, patches, per_slide)):
            count = min(per_slide, patches - first)
            name = f"slide{number:05d}"
            group = writer.begin(name)
            group.attrs.update({"source_path": str(PCAM), "fingerprint": f"bench:{number}", "mpp_source": "cli",
                                "level0_mpp": 0.97, "num_patches": count})
            i = np.arange(count)
            group.create_dataset("coords", data=np.stack([i % 128 * 96, i // 128 * 96], axis=1).astype(np.int64))
            group.create_dataset("tissue_fraction", data=np.ones(count, np.float32))
            dataset = create_pixel_dataset(group, "jpeg", count, 96)
            write_patches(dataset, 0, [jpegs[(first + k) % len(jpegs)] for k in range(count)], "jpeg")
            writer.commit(name)
    finally:
        writer.close()
    os.replace(tmp, path)


def build_encoder(path: Path, model_name: str, input_size: int) -> None:
    import timm

    if path.exists():
        return
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    meta = {"format": ENCODER_FORMAT, "version": 1, "timm_model": model_name, "num_features": model.num_features,
            "input_size": [3, input_size, input_size], "mean": [0.5] * 3, "std": [0.25] * 3}
    torch.save({"state_dict": model.state_dict(), "simclr_path": meta}, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def run_embed(encoder: Path, store: Path, out: Path, batch: int, workers: int, tag: str) -> dict:
    """One `simclr-path embed` subprocess: its JSON summary, wall seconds and peak RSS (MiB)."""
    log = out.parent / f"{out.name}-{tag}.stderr"
    result = out.parent / f"{out.name}-{tag}.json"
    cmd = [sys.executable, "-c", CLI, "embed", str(encoder), str(store), "--out", str(out), "--device", "cpu",
           "--batch", str(batch), "--workers", str(workers), "-q"]
    start = time.perf_counter()
    with open(log, "w") as err, open(result, "w") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone (and its reaped workers')
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"embed failed ({proc.returncode}); see {log}")
    summary = json.loads(result.read_text().strip().splitlines()[-1])
    return {"summary": summary, "seconds": seconds, "rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss is KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=5000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--per-slide", type=int, default=1000)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    encoder = WORK / f"encoder-{args.model}-{args.input_size}.pt"
    build_encoder(encoder, args.model, args.input_size)
    jpegs = source_jpegs()
    rows = []
    for patches in (args.patches, args.patches * args.factor):
        store = WORK / f"store-{patches}-{args.per_slide}.h5"
        build_store(store, patches, args.per_slide, jpegs)
        out = WORK / f"features-{patches}"
        shutil.rmtree(out, ignore_errors=True)
        for run in ("first", "rerun"):
            r = run_embed(encoder, store, out, args.batch, args.workers, run)
            s = r["summary"]
            with h5py.File(out / "features.h5") as f:
                assert f["features"].shape == (patches, s["feature_dim"])
            rate = s["patches_embedded"] / s["seconds"] if s["patches_embedded"] and s["seconds"] > 0 else 0.0
            rows.append((patches, s["slides"], run, s["slides_embedded"], r["seconds"], s["seconds"], rate,
                         r["rss_mib"], patches * s["feature_dim"] * 4 / 2**20))
        shutil.rmtree(out, ignore_errors=True)
    print(f"{args.model} at {args.input_size} px, batch {args.batch}, {args.workers} workers, "
          f"{args.per_slide} patches per slide, CPU ({os.cpu_count()} cores)")
    header = ("patches", "slides", "run", "slides embedded", "seconds (wall)", "seconds (in embed)", "patches/s",
              "peak RSS MiB", "features MiB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for p, slides, run, embedded, wall, inner, rate, rss, feat in rows:
        print(f"| {p:,} | {slides} | {run} | {embedded} | {wall:.1f} | {inner:.1f} | {rate:,.0f} | {rss:,.0f} "
              f"| {feat:,.0f} |")


if __name__ == "__main__":
    main()
