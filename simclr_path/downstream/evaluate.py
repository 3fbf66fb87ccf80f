"""Is the encoder useful? kNN and linear-probe accuracy on labelled patches, against a floor.

- kNN: see :mod:`simclr_path.engine.knn` (k=20, cosine, temperature-weighted votes).
- Linear probe: multinomial logistic regression on frozen, standardised features (L-BFGS, L2),
  its L2 strength chosen on a stratified 20% of the training set (held-out groups when the data
  has groups), then refitted on all of it.
- Floor: the same numbers for a randomly initialised encoder of the same architecture.

Labelled data: see :mod:`simclr_path.data.labeled`. The train/test split is, in order: the
``--test`` set ("test-set"), a CSV's ``split`` column ("csv"), by group when the data has groups
("group": no patient on both sides), else stratified by patch ("stratified").
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from simclr_path.data.labeled import (Labeled, cap_per_class, check_groups_disjoint, group_split, load_labeled,
                                      stratified_split, subset)
from simclr_path.engine.features import extract_features
from simclr_path.engine.knn import accuracy, knn_predict
from simclr_path.errors import SimclrPathError, check_loader_options


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
PROBE_HELD_OUT = 0.2


def probe_split(labels: np.ndarray, groups: np.ndarray | None = None, seed: int = 0,
                source: str = "the training set") -> tuple[np.ndarray, np.ndarray]:
    """(fit, held) indices of the training set for choosing the probe's L2 strength: a held-out fifth,
    stratified by patch, or by group when there are groups (so a patient's patches never help choose
    the strength they are scored with). A class may be missing from one side of a group split."""
    if groups is None:
        return stratified_split(np.asarray(labels), PROBE_HELD_OUT, seed)
    return group_split(labels, groups, PROBE_HELD_OUT, seed, source, every_class=False)


def tuned_linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                       seed: int = 0, groups: np.ndarray | None = None) -> tuple[torch.Tensor, float]:
    """Pick the L2 strength on a held-out fifth of the training set (by group when ``groups`` is given,
    see :func:`probe_split`); returns (predictions, strength)."""
    fit, held = probe_split(train_labels.numpy(), groups, seed)
    best, best_acc = PROBE_WEIGHT_DECAYS[0], -1.0
    for weight_decay in PROBE_WEIGHT_DECAYS:
        pred = linear_probe_predict(train[fit], train_labels[fit], train[held], num_classes, weight_decay)
        acc = (pred == train_labels[held]).float().mean().item()
        if acc > best_acc:
            best, best_acc = weight_decay, acc
    return linear_probe_predict(train, train_labels, test, num_classes, best), best


def score_features(train_f, train_y, test_f, test_y, num_classes: int, train_groups: np.ndarray | None = None) -> dict:
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    knn = accuracy(knn_predict(train_f, train_y, test_f, num_classes), test_y, num_classes)
    pred, weight_decay = tuned_linear_probe(train_f, train_y, test_f, num_classes, groups=train_groups)
    lin = accuracy(pred, test_y, num_classes)
    return {"knn_acc": round(knn[0], 4), "knn_balanced_acc": round(knn[1], 4),
            "linear_acc": round(lin[0], 4), "linear_balanced_acc": round(lin[1], 4),
            "linear_weight_decay": weight_decay}


def split_labeled(labeled: str, test: str | None, test_fraction: float, seed: int,
                  group_regex: str | None = None) -> tuple[Labeled, Labeled, str]:
    """(train, test, how): the labelled data split as the module docstring says. A given split
    (``--test``, a CSV ``split`` column) must keep every group on one side when both have groups."""
    train_data = load_labeled(labeled, group_regex)
    if test is not None:
        test_data = load_labeled(test, group_regex)
        if test_data.classes != train_data.classes:
            raise SimclrPathError(f"{test}: classes {test_data.classes} differ from {labeled}'s {train_data.classes}")
        how, source = "test-set", f"{labeled} and {test}"
    elif train_data.splits is not None and (train_data.splits == "test").any():
        test_data = subset(train_data, np.flatnonzero(train_data.splits == "test"))
        train_data = subset(train_data, np.flatnonzero(train_data.splits != "test"))
        how, source = "csv", labeled
    elif train_data.groups is not None:
        tr, te = group_split(train_data.labels, train_data.groups, test_fraction, seed, labeled,
                             classes=train_data.classes)
        return subset(train_data, tr), subset(train_data, te), "group"
    else:
        tr, te = stratified_split(train_data.labels, test_fraction, seed)
        return subset(train_data, tr), subset(train_data, te), "stratified"
    if train_data.groups is not None and test_data.groups is not None:
        check_groups_disjoint(train_data.groups, test_data.groups, source)
    return train_data, test_data, how


def _check_probe_groups(train: Labeled, labeled: str) -> None:
    """The probe holds out groups of the training side to choose its L2 strength: it needs two."""
    if train.groups is not None and len(np.unique(train.groups)) < 2:
        raise SimclrPathError(f"{labeled}: the training side has 1 group; the linear probe chooses its L2 strength "
                              "on held-out groups, so give it at least 2 (more groups, or a larger --max-per-class)")


def _group_counts(train: Labeled, test: Labeled) -> dict | None:
    if train.groups is None or test.groups is None:
        return None
    return {"train": int(len(np.unique(train.groups))), "test": int(len(np.unique(test.groups)))}


def evaluate_encoder(encoder_path: str, labeled: str, test: str | None = None, test_fraction: float = 0.3,
                     seed: int = 0, max_per_class: int | None = None, device: str = "auto", batch_size: int = 128,
                     workers: int = 2, random_floor: bool = True, progress=None,
                     group_regex: str | None = None) -> dict:
    """kNN and linear-probe scores of an exported encoder (and of a random-init floor).

    ``group_regex`` reads each patch's group (patient, case, slide) from its file name; a CSV
    ``group`` column does the same. With groups, no group is on both sides of any split.
    """
    import timm

    from simclr_path.downstream.encoder import load_encoder
    from simclr_path.runtime.device import resolve_device

    if not 0 < test_fraction < 1:
        raise SimclrPathError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if max_per_class is not None and max_per_class < 1:
        raise SimclrPathError(f"--max-per-class must be 1 or more, got {max_per_class}; leave it out to use every patch")
    check_loader_options(batch_size, workers)
    if seed < 0:
        raise SimclrPathError(f"--seed must be >= 0, got {seed}")
    dev = resolve_device(device)
    model, meta = load_encoder(encoder_path)
    train_data, test_data, how = split_labeled(labeled, test, test_fraction, seed, group_regex)
    train_data = subset(train_data, cap_per_class(train_data.labels, max_per_class, seed))
    test_data = subset(test_data, cap_per_class(test_data.labels, max_per_class, seed + 1))
    _check_probe_groups(train_data, labeled)
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
        "split": how,
    }
    groups = _group_counts(train_data, test_data)
    if groups is not None:
        result["groups"] = groups
    result["input_size"] = size
    result["pretrained"] = score_features(features(model, train_data), train_data.labels, features(model, test_data),
                                          test_data.labels, num_classes, train_data.groups)
    if random_floor:
        torch.manual_seed(seed)
        floor = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0)
        result["random_init"] = score_features(features(floor, train_data), train_data.labels,
                                               features(floor, test_data), test_data.labels, num_classes,
                                               train_data.groups)
    return result
