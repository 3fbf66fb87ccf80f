"""kNN classification of frozen features, and the kNN check that runs during pretraining.

kNN: cosine similarity to the training features, the k=20 nearest vote with weights
``exp(sim / 0.07)`` (temperature-weighted voting as in InstDisc, Wu et al. 2018).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from simclr_path.data.labeled import cap_per_class, load_labeled, stratified_split, subset
from simclr_path.engine.features import extract_features

KNN_K = 20
KNN_TEMPERATURE = 0.07


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


def accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """(accuracy, balanced accuracy = mean per-class recall)."""
    acc = (pred == target).float().mean().item()
    recalls = [(pred[target == c] == c).float().mean().item() for c in range(num_classes) if (target == c).any()]
    return acc, float(np.mean(recalls))


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
