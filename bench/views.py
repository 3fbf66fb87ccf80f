"""Two-view sampler throughput: ours (albumentations, uint8) vs the lightly-style torchvision recipe.

Both read the same patches from a store (JPEG decode included) and produce two views per patch.
The baseline is the standard SimCLR transform as lightly writes it (PIL images, torchvision
RandomResizedCrop, flips, 90-degree rotation, ColorJitter(0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale
p=0.2, Gaussian blur p=0.5, ToTensor, Normalize), written out here rather than imported.
Reports pairs/s in one process (per core) and through a DataLoader with 1 and 2 workers.

"Run loader" rows time the two pipelines pretraining can use (``--augment``), through the run's own
loader (RunSampler + build_loader, ``--workers``), ``--batch`` patches per step, views ready on
``--device``: ``cpu`` (albumentations in the workers: decode + two views each; the main process moves
them to the device and normalises) and ``device`` (the workers decode; data/device_views.py makes
both views of the whole batch on the device). Each row gives pairs/s and host CPU ms per view: the
CPU seconds of the main process and of its loader workers (rusage of the reaped children) per view.

``--end-to-end`` then runs ``pretrain()`` itself (the run-long loader with 2 workers + the training
step, resnet18 at 96 px, batch 32 by default) and compares its views/s with the bare SimCLR step on
preloaded views - whether the loader keeps up (target >= 0.95x) - once per ``--augment``. It is
bench/train_step.py's end-to-end row; run that script for the per-step breakdown.

Usage: python bench/views.py [--store patches.h5] [--size 224] [--n 400] [--device cpu|cuda] [--workers 2]
                             [--batch 64] [--batches 8] [--only-pipelines] [--end-to-end]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simclr_path import PatchStore  # noqa: E402
from simclr_path.data.datasets import PatchDataset, TwoViewDataset  # noqa: E402
from simclr_path.data.device_views import DeviceViews  # noqa: E402
from simclr_path.data.loader import RunSampler, build_loader, run_batches  # noqa: E402
from simclr_path.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize  # noqa: E402
from simclr_path.data.views import ViewConfig  # noqa: E402


class RandomRotate90:
    def __call__(self, img):
        return img.rotate(90 * random.randint(0, 3))


class LightlyStyleTwoViews(torch.utils.data.Dataset):
    def __init__(self, store, size: int):
        kernel = 2 * int(round(0.05 * size)) + 1
        self.store = store
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.RandomApply([RandomRotate90()], p=0.5),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self):
        return len(self.store)

    def __getitem__(self, index):
        image = Image.fromarray(self.store[index])
        return self.transform(image), self.transform(image)


def rate_single(dataset, n: int) -> float:
    dataset[0]
    start = time.perf_counter()
    for i in range(n):
        dataset[i % len(dataset)]
    return n / (time.perf_counter() - start)


def rate_loader(dataset, n: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=workers, shuffle=True, drop_last=True,
                                         persistent_workers=False)
    it = iter(loader)
    next(it)  # workers started
    start = time.perf_counter()
    count = 0
    while count < n:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        count += batch[0].shape[0]
    return count / (time.perf_counter() - start)


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its reaped children (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pipeline_rate(store, cfg: ViewConfig, augment: str, workers: int, batch: int, batches: int,
                  device: torch.device) -> tuple[float, float]:
    """(pairs/s, host CPU ms per view) of one pipeline through the run loader, views ready on ``device``.

    The first batch (worker start-up) is left out of the rate; the CPU time counts every batch,
    start-up included (the workers' rusage is known once they are reaped), over every view made.
    """
    dataset = PatchDataset(store, seed=0) if augment == "device" else TwoViewDataset(store, cfg, seed=0)
    if batch > len(store):
        raise SystemExit(f"--batch {batch} is larger than the {len(store)} patches of the store")
    epochs = -(-(batches + 1) // (len(store) // batch))  # enough whole-batch epochs for batches + 1
    sampler = RunSampler(len(store), 1, 0, seed=0, per_rank_batch=batch, epochs=epochs)
    views = DeviceViews(cfg, seed=0).to(device) if augment == "device" else None
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
    cpu_start = _cpu_seconds()
    with run_batches(build_loader(dataset, sampler, workers, pin_memory=device.type == "cuda")) as it:
        for step in range(batches + 1):
            if step == 1:
                sync(device)
                start = time.perf_counter()
            data = next(it).to(device, non_blocking=True)
            out = views(data, step) if views is not None else normalize(data.permute(0, 3, 1, 2), mean, std)
        sync(device)
        seconds = time.perf_counter() - start
    assert out.shape[0] == 2 * batch
    cpu = _cpu_seconds() - cpu_start
    return batches * batch / seconds, 1e3 * cpu / ((batches + 1) * 2 * batch)


def default_store(tmp: str) -> str:
    from simclr_path.wsi.grid import TileSpec
    from simclr_path.wsi.tiler import tile_slides

    slide = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
    out = str(Path(tmp) / "views.h5")
    # stride 48: the 1,249 patches of the first GPU run (enough for whole batches of 256)
    tile_slides([str(slide)], out, TileSpec(target_mpp=0.5, patch_size=256, stride=48, min_tissue=0.1), workers=0)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--end-to-end", action="store_true",
                        help="also run pretrain() with each --augment and compare it with the bare step")
    parser.add_argument("--device", default="cpu", help="where the run-loader rows put (device: make) the views")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the run-loader rows")
    parser.add_argument("--batch", type=int, default=64, help="patches per batch of the run-loader rows")
    parser.add_argument("--batches", type=int, default=8, help="timed batches of the run-loader rows")
    parser.add_argument("--only-pipelines", action="store_true", help="only the run-loader rows (the GPU check)")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        store = PatchStore(args.store or default_store(tmp))
        pipelines = [(augment, *pipeline_rate(store, ViewConfig(image_size=args.size), augment, args.workers,
                                              args.batch, args.batches, device))
                     for augment in ("cpu", "device")]
        print(f"\nRun loader: {args.workers} workers, batch {args.batch}, {args.size} px views of "
              f"{store.patch_size}-px patches, ready on {device} ({torch.get_num_threads()} torch threads in the main "
              f"process, {os.cpu_count()} cores)")
        print(f"{'--augment':10} | {'pairs/s':>8} | {'host CPU ms/view':>16}")
        print("-" * 42)
        for augment, rate, cpu_ms in pipelines:
            print(f"{augment:10} | {rate:8.0f} | {cpu_ms:16.2f}")
        (_, cpu_rate, cpu_ms), (_, dev_rate, dev_ms) = pipelines
        print(f"device / cpu: {dev_rate / cpu_rate:.2f}x pairs/s, {dev_ms / cpu_ms:.2f}x host CPU per view")
        if args.only_pipelines:
            return
        torch.set_num_threads(1)
        ours = TwoViewDataset(store, ViewConfig(image_size=args.size))
        ours_he = TwoViewDataset(store, ViewConfig(image_size=args.size, he_stain_p=0.5))
        theirs = LightlyStyleTwoViews(store, args.size)
        rows = []
        for name, ds in (("simclr-path (albumentations)", ours), ("simclr-path + HEStain p=0.5", ours_he),
                         ("lightly-style torchvision/PIL", theirs)):
            rows.append((name, rate_single(ds, args.n), rate_loader(ds, args.n, 1), rate_loader(ds, args.n, 2)))
    print(f"\nTwo-view pairs/s at {args.size} px from {len(store)} {store.patch_size}-px store patches")
    print(f"{'pipeline':32} | {'1 process':>9} | {'1 worker':>8} | {'2 workers':>9}")
    print("-" * 67)
    for name, single, w1, w2 in rows:
        print(f"{name:32} | {single:9.0f} | {w1:8.0f} | {w2:9.0f}")
    base = rows[-1][1]
    print(f"\nspeed-up per core (1 process) vs lightly-style: {rows[0][1] / base:.2f}x; with HEStain: {rows[1][1] / base:.2f}x")
    if args.end_to_end:
        import subprocess

        for augment in ("cpu", "device"):
            command = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--workers", str(args.workers),
                       "--augment", augment]
            if args.store:
                command += ["--store", args.store]
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
