"""What ``segment`` trains on: labelled patches with their masks and unlabelled patches in two views.

Every step's batch is a pure function of ``(seed, step)``: :class:`StepBatches` walks seeded
permutations of the labelled and the unlabelled patch indices, and each sample's augmentation is
drawn from a seed of ``(seed, step, slot)``. So a resumed run sees exactly the batches an
uninterrupted one would, whatever the worker count.

Views (albumentations):

* weak: flips and 90-degree rotations, applied to image and mask alike (tissue has no up or down);
* strong (FixMatch's student view of an unlabelled patch): the weak view's geometry plus H&E stain,
  colour jitter, grayscale and blur - photometric only, so the teacher's pseudo-label of the weak
  view lines up pixel for pixel with the strong view;
* CutMix of strong views (French et al. 2020, "Semi-supervised semantic segmentation needs strong,
  varied perturbations"): :func:`cutmix_boxes` draws, per step, which unlabelled patches get a
  rectangle pasted from their neighbour in the batch; the training step moves the teacher's
  pseudo-labels with the pixels.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch

from simclr_path.data.input_spec import InputSpec
from simclr_path.segment.labels import LabelSet
from simclr_path.store import PatchStore

LABELLED, UNLABELLED = 0, 1


def weak_transform() -> A.Compose:
    """Geometry only: image and mask move together."""
    return A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0)])


def strong_transform(image_size: int) -> A.Compose:
    """Photometric only (the weak view's geometry is kept): stain, colour, grayscale, blur."""
    kernel = 2 * int(round(0.05 * image_size)) + 1
    return A.Compose([
        A.HEStain(method="random_preset", p=0.5),
        A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
        A.ToGray(num_output_channels=3, p=0.2),
        A.GaussianBlur(blur_limit=(kernel, kernel), sigma_limit=(0.1, 2.0), p=0.5),
    ])


#: Area of a CutMix rectangle, as a fraction of the patch, and its aspect ratio (height / width).
CUTMIX_AREA = (0.1, 0.5)
CUTMIX_ASPECT = (0.3, 1 / 0.3)


def cutmix_boxes(count: int, size: int, p: float, seed: int, step: int) -> torch.Tensor:
    """(count, size, size) bool: True where unlabelled patch i shows patch i - 1 of the batch (cyclic).

    Each patch gets a rectangle with probability ``p`` (area in :data:`CUTMIX_AREA`, log-uniform
    aspect in :data:`CUTMIX_ASPECT`, anywhere inside the patch); a pure function of (seed, step),
    so a resumed run mixes exactly as an uninterrupted one.
    """
    digest = hashlib.blake2b(f"cutmix:{seed}:{step}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    boxes = np.zeros((count, size, size), dtype=bool)
    for i in range(count):
        if count < 2 or rng.random() >= p:
            continue
        area = rng.uniform(*CUTMIX_AREA) * size * size
        aspect = math.exp(rng.uniform(math.log(CUTMIX_ASPECT[0]), math.log(CUTMIX_ASPECT[1])))
        h = min(size, max(1, int(round(math.sqrt(area * aspect)))))
        w = min(size, max(1, int(round(math.sqrt(area / aspect)))))
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        boxes[i, y:y + h, x:x + w] = True
    return torch.from_numpy(boxes)


def paste_neighbours(pasted: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each of ``tensors`` ((N, H, W) or (N, C, H, W)) with patch i - 1's values where ``pasted[i]``
    (from :func:`cutmix_boxes`) is True: images, pseudo-labels and confidences move together."""
    out = []
    for tensor in tensors:
        where = pasted.view(pasted.shape[0], *([1] * (tensor.dim() - 3)), *pasted.shape[1:])
        out.append(torch.where(where, tensor.roll(1, 0), tensor))
    return out


def sample_seed(seed: int, step: int, slot: int) -> int:
    digest = hashlib.blake2b(f"segment:{seed}:{step}:{slot}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def resize_pair(image: np.ndarray, mask: np.ndarray | None, spec: InputSpec):
    """Image (the input spec's resize, as at inference) and mask (nearest) to the network's input side."""
    if mask is not None and mask.shape[:2] != (spec.size, spec.size):
        mask = cv2.resize(mask, (spec.size, spec.size), interpolation=cv2.INTER_NEAREST)
    return spec.resize(image), mask


class SegmentationSamples(torch.utils.data.Dataset):
    """``dataset[(kind, index, seed)]``: a labelled sample ``(image, mask)`` or an unlabelled one
    ``(weak, strong)``; images uint8 (S, S, 3), masks uint8 (S, S) with 255 unlabelled."""

    def __init__(self, store: PatchStore, labels: LabelSet, spec: InputSpec):
        self.store, self.labels, self.spec = store, labels, spec
        self.weak, self.strong = weak_transform(), strong_transform(spec.size)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key):
        kind, index, seed = key
        self._seed(seed)
        image = self.store[index]
        if kind == LABELLED:
            image, mask = resize_pair(image, self.labels.patch_mask(self.store, index), self.spec)
            out = self.weak(image=image, mask=mask)
            return torch.from_numpy(np.ascontiguousarray(out["image"])), torch.from_numpy(np.ascontiguousarray(out["mask"]))
        image, _ = resize_pair(image, None, self.spec)
        weak = np.ascontiguousarray(self.weak(image=image)["image"])
        strong = np.ascontiguousarray(self.strong(image=weak)["image"])
        return torch.from_numpy(weak), torch.from_numpy(strong)

    def _seed(self, seed: int) -> None:
        # one generator pair shared by every transform: each decision its own draw (see data.views.draw_views)
        rng, py = np.random.default_rng(seed), random.Random(seed)
        self.weak.set_random_state(rng, py)
        self.strong.set_random_state(rng, py)


def _position(indices: np.ndarray, seed: int, stream: str, start: int, count: int) -> np.ndarray:
    """Items ``start .. start + count`` of the endless sequence of seeded permutations of ``indices``."""
    n = len(indices)
    out = []
    while count > 0:
        epoch, offset = divmod(start, n)
        digest = hashlib.blake2b(f"{stream}:{seed}:{epoch}".encode(), digest_size=8).digest()
        order = np.random.default_rng(int.from_bytes(digest, "little")).permutation(n)
        take = min(count, n - offset)
        out.append(indices[order[offset:offset + take]])
        start, count = start + take, count - take
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclass
class StepBatches(torch.utils.data.Sampler):
    """Batch sampler: for each step from ``start_step`` to ``total_steps``, ``labelled_batch`` labelled
    keys then ``unlabelled_batch`` unlabelled ones (``(kind, index, seed)`` for :class:`SegmentationSamples`)."""

    labelled: np.ndarray
    unlabelled: np.ndarray
    labelled_batch: int
    unlabelled_batch: int
    seed: int
    start_step: int
    total_steps: int

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            keys = []
            chosen = _position(self.labelled, self.seed, "labelled", step * self.labelled_batch, self.labelled_batch)
            keys += [(LABELLED, int(i), sample_seed(self.seed, step, slot)) for slot, i in enumerate(chosen)]
            if self.unlabelled_batch:
                chosen = _position(self.unlabelled, self.seed, "unlabelled", step * self.unlabelled_batch,
                                   self.unlabelled_batch)
                keys += [(UNLABELLED, int(i), sample_seed(self.seed, step, self.labelled_batch + slot))
                         for slot, i in enumerate(chosen)]
            yield keys

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def collate(samples, labelled_batch: int):
    """``(images, masks, weak, strong)``: uint8 NHWC / NHW tensors (the last two None without unlabelled)."""
    labelled, unlabelled = samples[:labelled_batch], samples[labelled_batch:]
    images = torch.stack([s[0] for s in labelled])
    masks = torch.stack([s[1] for s in labelled])
    if not unlabelled:
        return images, masks, None, None
    return images, masks, torch.stack([s[0] for s in unlabelled]), torch.stack([s[1] for s in unlabelled])

