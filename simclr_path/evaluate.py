"""Is the encoder useful? kNN and linear-probe accuracy on labelled patches, against a floor.

- kNN: cosine similarity to the training features, the k=20 nearest vote with weights
  ``exp(sim / 0.07)`` (temperature-weighted voting as in InstDisc, Wu et al. 2018).
- Linear probe: multinomial logistic regression on frozen, standardised features (L-BFGS, L2),
  its L2 strength chosen on a stratified 20% of the training set, then refitted on all of it.
- Floor: the same numbers for a randomly initialised encoder of the same architecture.

Labelled data: a folder per class (ImageFolder convention), a CSV with ``path`` and ``label``
columns (optionally ``split`` with ``train``/``test`` values; other names such as PCam's ``valid``
count as train), or a patch store ingested with labels.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simclr_path.errors import SimclrPathError
from simclr_path.features import extract_features
from simclr_path.store.ingest import IMAGE_EXTENSIONS
from simclr_path.store import PatchStore, PatchSubset

KNN_K = 20
KNN_TEMPERATURE = 0.07


@dataclass
class Labeled:
    """Images (paths or a PatchStore with indices) with integer labels."""

    images: list
    labels: np.ndarray
    classes: list[str]
    splits: np.ndarray | None = None  # "train"/"test" per item, when the source says


def load_labeled(source: str) -> Labeled:
    """Read labelled patches from a class-folder tree, a CSV or an ingested store."""
    path = Path(source)
    if not path.exists():
        raise SimclrPathError(f"{source}: no such folder, CSV or store")
    if path.is_dir():
        classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        images, labels = [], []
        for index, name in enumerate(classes):
            files = sorted(p for p in (path / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            images += files
            labels += [index] * len(files)
        if len(classes) < 2 or not images:
            raise SimclrPathError(f"{source}: expected one subfolder of images per class (at least two classes)")
        return Labeled(images, np.array(labels), classes)
    if path.suffix.lower() == ".csv":
        return _load_csv(path)
    return _load_store(source)


def _load_csv(path: Path) -> Labeled:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "path" not in rows[0] or "label" not in rows[0]:
        raise SimclrPathError(f"{path}: a labelled CSV needs 'path' and 'label' columns")
    classes = sorted({r["label"] for r in rows})
    images = [path.parent / r["path"] for r in rows]
    missing = [str(p) for p in images if not p.exists()]
    if missing:
        raise SimclrPathError(f"{path}: {len(missing)} listed image(s) missing, e.g. {missing[0]}")
    splits = None
    if "split" in rows[0]:
        splits = np.array(["test" if r["split"] == "test" else "train" for r in rows])
    return Labeled(images, np.array([classes.index(r["label"]) for r in rows]), classes, splits)


def _load_store(source: str) -> Labeled:
    store = PatchStore(source)
    names = store.attrs[0].get("class_names")
    if names is None:
        raise SimclrPathError(f"{source}: the store has no labels; ingest a class-folder tree with 'simclr-path ingest'")
    labels = np.array([store.label(i) for i in range(len(store))])
    return Labeled(PatchSubset(store, range(len(store))), labels, [str(n) for n in names])


def subset(data: Labeled, indices) -> Labeled:
    indices = np.asarray(indices)
    images = data.images
    if isinstance(images, PatchSubset):
        picked = PatchSubset(images.store, [images.indices[i] for i in indices])
    else:
        picked = [images[i] for i in indices]
    return Labeled(picked, data.labels[indices], data.classes,
                   None if data.splits is None else data.splits[indices])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(round(test_fraction * len(idx))))
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return np.sort(train), np.sort(test)


def cap_per_class(labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    if cap is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """Temperature-weighted kNN votes with cosine similarity."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test), 1024):
        sims, idx = (test[start:start + 1024] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def linear_probe_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                         weight_decay: float = 1e-4, iterations: int = 200) -> torch.Tensor:
    """Multinomial logistic regression on standardised features, fitted with L-BFGS."""
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    x, x_test = (train - mean) / std, (test - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), train_labels) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return linear(x_test).argmax(dim=1)


PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def tuned_linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                       seed: int = 0) -> tuple[torch.Tensor, float]:
    """Pick the L2 strength on a held-out fifth of the training set; returns (predictions, strength)."""
    fit, held = stratified_split(train_labels.numpy(), 0.2, seed)
    best, best_acc = PROBE_WEIGHT_DECAYS[0], -1.0
    for weight_decay in PROBE_WEIGHT_DECAYS:
        pred = linear_probe_predict(train[fit], train_labels[fit], train[held], num_classes, weight_decay)
        acc = (pred == train_labels[held]).float().mean().item()
        if acc > best_acc:
            best, best_acc = weight_decay, acc
    return linear_probe_predict(train, train_labels, test, num_classes, best), best


def accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """(accuracy, balanced accuracy = mean per-class recall)."""
    acc = (pred == target).float().mean().item()
    recalls = [(pred[target == c] == c).float().mean().item() for c in range(num_classes) if (target == c).any()]
    return acc, float(np.mean(recalls))


def score_features(train_f, train_y, test_f, test_y, num_classes: int) -> dict:
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    knn = accuracy(knn_predict(train_f, train_y, test_f, num_classes), test_y, num_classes)
    pred, weight_decay = tuned_linear_probe(train_f, train_y, test_f, num_classes)
    lin = accuracy(pred, test_y, num_classes)
    return {"knn_acc": round(knn[0], 4), "knn_balanced_acc": round(knn[1], 4),
            "linear_acc": round(lin[0], 4), "linear_balanced_acc": round(lin[1], 4),
            "linear_weight_decay": weight_decay}


class KnnMonitor:
    """kNN accuracy of the backbone during pretraining, on a fixed labelled split."""

    def __init__(self, source: str, image_size: int, mean, std, max_per_class: int = 250, seed: int = 0):
        data = load_labeled(source)
        if data.splits is not None and (data.splits == "test").any():
            train, test = np.flatnonzero(data.splits != "test"), np.flatnonzero(data.splits == "test")
        else:
            train, test = stratified_split(data.labels, 0.3, seed)
        self.train, self.test = subset(data, train), subset(data, test)
        self.train = subset(self.train, cap_per_class(self.train.labels, max_per_class, seed))
        self.test = subset(self.test, cap_per_class(self.test.labels, max_per_class, seed + 1))
        self.size, self.mean, self.std = image_size, mean, std
        self.num_classes = len(data.classes)

    def __call__(self, backbone: torch.nn.Module, device: torch.device) -> float:
        def features(data):
            return extract_features(backbone, data.images, self.size, self.mean, self.std, device, 128, 0)

        pred = knn_predict(features(self.train), torch.as_tensor(self.train.labels), features(self.test),
                           self.num_classes)
        return accuracy(pred, torch.as_tensor(self.test.labels), self.num_classes)[0]


def evaluate_encoder(encoder_path: str, labeled: str, test: str | None = None, test_fraction: float = 0.3,
                     seed: int = 0, max_per_class: int | None = None, device: str = "auto", batch_size: int = 128,
                     workers: int = 2, random_floor: bool = True, progress=None) -> dict:
    """kNN and linear-probe scores of an exported encoder (and of a random-init floor)."""
    import timm

    from simclr_path.export import load_encoder
    from simclr_path.runtime.device import resolve_device

    if not 0 < test_fraction < 1:
        raise SimclrPathError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    dev = resolve_device(device)
    model, meta = load_encoder(encoder_path)
    train_data = load_labeled(labeled)
    if test is not None:
        test_data = load_labeled(test)
        if test_data.classes != train_data.classes:
            raise SimclrPathError(f"{test}: classes {test_data.classes} differ from {labeled}'s {train_data.classes}")
    elif train_data.splits is not None and (train_data.splits == "test").any():
        test_data = subset(train_data, np.flatnonzero(train_data.splits == "test"))
        train_data = subset(train_data, np.flatnonzero(train_data.splits != "test"))
    else:
        tr, te = stratified_split(train_data.labels, test_fraction, seed)
        train_data, test_data = subset(train_data, tr), subset(train_data, te)
    train_data = subset(train_data, cap_per_class(train_data.labels, max_per_class, seed))
    test_data = subset(test_data, cap_per_class(test_data.labels, max_per_class, seed + 1))
    size, mean, std = meta["input_size"][-1], meta["mean"], meta["std"]
    num_classes = len(train_data.classes)

    def features(net, data):
        return extract_features(net.to(dev), data.images, size, mean, std, dev, batch_size, workers, progress)

    result = {
        "encoder": os.path.abspath(encoder_path),
        "timm_model": meta["timm_model"],
        "classes": train_data.classes,
        "n_train": int(len(train_data.labels)),
        "n_test": int(len(test_data.labels)),
        "input_size": size,
        "pretrained": score_features(features(model, train_data), train_data.labels, features(model, test_data),
                                     test_data.labels, num_classes),
    }
    if random_floor:
        torch.manual_seed(seed)
        floor = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0)
        result["random_init"] = score_features(features(floor, train_data), train_data.labels,
                                               features(floor, test_data), test_data.labels, num_classes)
    return result
