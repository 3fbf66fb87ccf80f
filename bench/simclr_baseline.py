"""Textbook SimCLR (torch + torchvision only), trained for a wall-clock budget; the baseline of bench/quality.py.

- Views: the SimCLR paper's torchvision recipe at 96 px: RandomResizedCrop(96, scale=(0.08, 1)),
  RandomHorizontalFlip, RandomApply(ColorJitter(0.8, 0.8, 0.8, 0.2), p=0.8), RandomGrayscale(0.2),
  RandomApply(GaussianBlur(9, (0.1, 2.0)), p=0.5), ToTensor, Normalize(ImageNet mean/std); PIL
  images read from an image folder (every png/jpg/tif under it; folder names, i.e. labels, ignored).
- Model: torchvision resnet18 (fc = Identity, 512 features), head Linear(512, 512) -> ReLU ->
  Linear(512, 128); NT-Xent, temperature 0.2, the 2N - 2 other views of the batch as negatives.
- Optimiser: lightly's SimCLR benchmark recipe: SGD, momentum 0.9, lr 0.06 x batch / 128,
  weight decay 5e-4, cosine decay without warmup - here over wall-clock time, from the first
  step to ``--deadline`` (when bench/quality.py sends SIGTERM), since the run is time-budgeted.
- Stops on SIGTERM after the current step (or at ``--max-steps``), then writes the backbone in
  simclr-path's encoder format (torch file: ``{"state_dict", "simclr_path": metadata}``; torchvision's
  resnet18 parameter names are timm's) so it is evaluated by exactly the same code as ours.
- Appends ``{"step", "time"}`` to ``--progress`` (JSON lines) after every step.

Usage: python bench/simclr_baseline.py IMAGE_DIR --out encoder.pt [--batch 128] [--workers 2]
       [--seed 0] [--deadline UNIX_TIME] [--max-steps N] [--progress progress.jsonl] [--device cpu]
"""

from __future__ import annotations

import signal

STOP = {"requested": False}
signal.signal(signal.SIGTERM, lambda signum, frame: STOP.update(requested=True))  # before the slow imports

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE, TEMPERATURE, FEATURES = 96, 0.2, 512
EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


class TwoViews(torch.utils.data.Dataset):
    def __init__(self, folder: str):
        self.paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in EXTENSIONS)
        if not self.paths:
            raise SystemExit(f"{folder}: no images")
        self.transform = T.Compose([
            T.RandomResizedCrop(SIZE, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=0.5),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = Image.open(self.paths[index]).convert("RGB")
        return self.transform(image), self.transform(image)


class SimCLR(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torchvision.models.resnet18(weights=None)
        self.backbone.fc = nn.Identity()
        self.head = nn.Sequential(nn.Linear(FEATURES, 512), nn.ReLU(inplace=True), nn.Linear(512, 128))

    def forward(self, x):
        return self.head(self.backbone(x))


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images")
    parser.add_argument("--out", required=True, help="encoder file (.pt) to write")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=None, help="unix time the cosine schedule ends at")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--progress", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    dataset = TwoViews(args.images)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         pin_memory=device.type == "cuda")
    model = SimCLR().to(device)
    base_lr = 0.06 * args.batch / 128
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=0.9, weight_decay=5e-4)
    progress = open(args.progress, "a") if args.progress else None
    step, epoch, started = 0, 0, time.time()
    model.train()
    while not STOP["requested"] and (args.max_steps is None or step < args.max_steps):
        for x0, x1 in loader:
            if args.deadline is not None:  # cosine over wall-clock time: 1 at the first step, 0 at the deadline
                done = min(max((time.time() - started) / max(args.deadline - started, 1e-9), 0.0), 1.0)
                for group in optimizer.param_groups:
                    group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * done))
            x0, x1 = x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)
            loss = nt_xent(*model(torch.cat([x0, x1])).chunk(2))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if not math.isfinite(loss.item()):
                raise SystemExit(f"loss became {loss.item()} at step {step}")
            if progress is not None:
                progress.write(json.dumps({"step": step, "time": time.time(), "loss": round(loss.item(), 4)}) + "\n")
                progress.flush()
            if STOP["requested"] or (args.max_steps is not None and step >= args.max_steps):
                break
        else:
            epoch += 1
    save_encoder(model.backbone, args.out, steps=step, batch=args.batch, patches=len(dataset))
    print(json.dumps({"encoder": os.path.abspath(args.out), "steps": step, "epochs_completed": epoch,
                      "seconds": round(time.time() - started, 2)}))


def save_encoder(backbone: nn.Module, out: str, steps: int, batch: int, patches: int) -> None:
    """The backbone (no fc) in simclr-path's export format: timm's resnet18 names, plus the metadata."""
    state = {k: v.detach().cpu().clone().contiguous() for k, v in backbone.state_dict().items()
             if not k.startswith("fc.")}
    metadata = {
        "format": "simclr-path encoder", "version": 1, "tool_version": "bench/simclr_baseline.py",
        "timm_model": "resnet18", "num_features": FEATURES, "input_size": [3, SIZE, SIZE],
        "mean": list(MEAN), "std": list(STD), "patch_mpp": None, "patch_magnification": None, "patch_size": None,
        "input_mpp": None, "crop_scale": [0.08, 1.0], "store_resolutions": [],
        "training": {"steps": steps, "total_steps": steps, "epoch": steps * batch // patches, "global_batch": batch,
                     "temperature": TEMPERATURE, "patches": patches, "stores": []},
    }
    tmp = f"{out}.tmp"
    torch.save({"state_dict": state, "simclr_path": metadata}, tmp)
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
