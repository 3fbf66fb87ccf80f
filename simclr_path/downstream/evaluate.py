"""Is the encoder useful? kNN and linear-probe accuracy on labelled patches, against a floor.

- kNN: see :mod:`simclr_path.engine.knn` (k=20, cosine, temperature-weighted votes).
- Linear probe: multinomial logistic regression on frozen, standardised features (L-BFGS, L2),
  its L2 strength chosen on a stratified 20% of the training set, then refitted on all of it.
- Floor: the same numbers for a randomly initialised encoder of the same architecture.

Labelled data: see :mod:`simclr_path.data.labeled`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from simclr_path.data.labeled import cap_per_class, load_labeled, stratified_split, subset
from simclr_path.engine.features import extract_features
from simclr_path.engine.knn import accuracy, knn_predict
from simclr_path.errors import SimclrPathError


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


def score_features(train_f, train_y, test_f, test_y, num_classes: int) -> dict:
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    knn = accuracy(knn_predict(train_f, train_y, test_f, num_classes), test_y, num_classes)
    pred, weight_decay = tuned_linear_probe(train_f, train_y, test_f, num_classes)
    lin = accuracy(pred, test_y, num_classes)
    return {"knn_acc": round(knn[0], 4), "knn_balanced_acc": round(knn[1], 4),
            "linear_acc": round(lin[0], 4), "linear_balanced_acc": round(lin[1], 4),
            "linear_weight_decay": weight_decay}


def evaluate_encoder(encoder_path: str, labeled: str, test: str | None = None, test_fraction: float = 0.3,
                     seed: int = 0, max_per_class: int | None = None, device: str = "auto", batch_size: int = 128,
                     workers: int = 2, random_floor: bool = True, progress=None) -> dict:
    """kNN and linear-probe scores of an exported encoder (and of a random-init floor)."""
    import timm

    from simclr_path.downstream.encoder import load_encoder
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
