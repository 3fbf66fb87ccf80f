"""Inference throughput of `embed`, `predict` and segment inference against the bare forward pass.

Each command is run in this process, as its library call, over every patch of one store (default:
CMU-1-Small-Region tiled at ``--patch-size`` and ``--stride``; stride 16 gives ~12k patches of 224 px):

- embed: :func:`simclr_path.downstream.embed.embed_stores` with a random-init timm encoder in the
  export format (``--model``, input ``--patch-size``): read + decode in ``--workers`` loader workers,
  normalise, forward, features written to HDF5.
- predict: :func:`simclr_path.segment.predict.predict_slides` with a random-init segment run (smp Unet
  on ``--model``, 2 classes): per-slide class map and GeoJSON.
- segment inference: :func:`simclr_path.segment.infer.predict_patches` over the store (what
  ``segment-eval`` runs), the softmax probabilities copied back to the host.

"bare" is the same model on the same batch size and input, preloaded on the device as uint8,
normalised and run forward (bf16 autocast on CUDA, as the commands do) without any loader: the
ceiling each command is measured against (target >= 0.8x). Patches/s of a command is its patch
count over the wall time of its library call (model loading and loader start-up included).
``segment`` training throughput is not measured here.

Usage: python bench/downstream_throughput.py [--device cuda] [--model resnet50] [--patch-size 224]
       [--stride 16] [--batch 256] [--workers 4] [--store patches.h5] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simclr_path import PatchStore  # noqa: E402
from simclr_path.data.normalize import normalize  # noqa: E402
from simclr_path.downstream.encoder import ENCODER_FORMAT  # noqa: E402
from simclr_path.engine.checkpoint import save_checkpoint  # noqa: E402
from simclr_path.segment.checkpoint import SEGMENT_CHECKPOINT, SEGMENT_KIND  # noqa: E402
from simclr_path.segment.model import build_unet  # noqa: E402

MEAN, STD = [0.5] * 3, [0.25] * 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tile_store(work: Path, patch_size: int, stride: int) -> str:
    from simclr_path.wsi.grid import TileSpec
    from simclr_path.wsi.tiler import tile_slides

    out = work / f"cmu-{patch_size}-s{stride}.h5"
    if not out.exists():
        slide = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
        tile_slides([str(slide)], str(out), TileSpec(target_mpp=0.5, patch_size=patch_size, stride=stride,
                                                     min_tissue=0.1), workers=min(8, os.cpu_count() or 1))
    return str(out)


def bare_rate(model: torch.nn.Module, batch: int, size: int, device: torch.device, batches: int) -> float:
    """Patches/s of ``model`` forward on preloaded uint8 batches (normalised on the device), median of ``batches``."""
    model.eval()
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    times = []
    with torch.no_grad():
        for i in range(batches + 2):
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(normalize(x, MEAN, STD)).float()
            sync(device)
            if i >= 2:  # two warm-up batches (cudnn autotune)
                times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def encoder_file(path: Path, model_name: str, size: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    meta = {"format": ENCODER_FORMAT, "version": 1, "timm_model": model_name, "num_features": model.num_features,
            "input_size": [3, size, size], "mean": MEAN, "std": STD}
    torch.save({"state_dict": model.state_dict(), "simclr_path": meta}, path)
    return model


def segment_run(folder: Path, model_name: str, store: PatchStore) -> torch.nn.Module:
    torch.manual_seed(0)
    unet = build_unet(model_name, 2)
    mpp = store.attrs[0].get("target_mpp")
    meta = {"classes": ["background", "tissue"], "image_size": store.patch_size, "mean": MEAN, "std": STD,
            "input_mpp": float(mpp) if mpp is not None else None, "patch_size": store.patch_size,
            "patch_mpp": float(mpp) if mpp is not None else None, "timm_model": model_name}
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"kind": SEGMENT_KIND, "model": unet.state_dict(), "meta": meta, "step": 0, "config": {}},
                    str(folder / SEGMENT_CHECKPOINT))
    return unet


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--patch-size", type=int, default=224)
    parser.add_argument("--stride", type=int, default=16, help="tiling stride of the default store (16: ~12k patches)")
    parser.add_argument("--store", default=None, help="use this store instead of tiling CMU-1-Small-Region")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--bare-batches", type=int, default=10, help="timed batches of each bare forward")
    parser.add_argument("--work", type=Path, default=None, help="keep the tiled store here (default: a temp folder)")
    args = parser.parse_args()
    device = torch.device(args.device)
    from simclr_path.downstream.embed import embed_stores
    from simclr_path.segment.infer import predict_patches
    from simclr_path.segment.predict import predict_slides

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        store_path = args.store or tile_store(work, args.patch_size, args.stride)
        store = PatchStore(store_path)
        n, size = len(store), store.patch_size
        print(f"{n} patches of {size} px; {args.model}, batch {args.batch}, {args.workers} workers, device {device}",
              file=sys.stderr)
        encoder = encoder_file(Path(tmp) / "encoder.pt", args.model, size).to(device)
        unet = segment_run(Path(tmp) / "segment-run", args.model, store).to(device)
        bare_encoder = bare_rate(encoder, args.batch, size, device, args.bare_batches)
        bare_unet = bare_rate(unet, args.batch, size, device, args.bare_batches)
        del encoder, unet
        rows = []
        seconds = timed(lambda: embed_stores(str(Path(tmp) / "encoder.pt"), [store_path], str(Path(tmp) / "features"),
                                             device=args.device, batch_size=args.batch, workers=args.workers))
        rows.append(("embed", n / seconds, bare_encoder))
        seconds = timed(lambda: predict_slides(str(Path(tmp) / "segment-run"), [store_path], str(Path(tmp) / "masks"),
                                               device=args.device, batch_size=args.batch, workers=args.workers))
        rows.append(("predict", n / seconds, bare_unet))

        def segment_inference():
            from simclr_path.segment.model import load_segment_run

            model, meta = load_segment_run(str(Path(tmp) / "segment-run"), device)
            for _ in predict_patches(model, meta, store, device=device, batch_size=args.batch, workers=args.workers):
                pass

        rows.append(("segment inference", n / timed(segment_inference), bare_unet))
    print(f"\nInference over {n} patches of {size} px, {args.model}, batch {args.batch}, {args.workers} loader workers, "
          f"{device}")
    print(f"{'command':18} | {'patches/s':>9} | {'bare fwd/s':>10} | {'ratio':>6}")
    print("-" * 54)
    for name, rate, bare in rows:
        print(f"{name:18} | {rate:9.1f} | {bare:10.1f} | {rate / bare:5.2f}x")
    print("target: >= 0.80x each (bare: the same model forward on preloaded batches, no loader)")


if __name__ == "__main__":
    main()
