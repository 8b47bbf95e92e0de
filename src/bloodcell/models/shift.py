"""Out-of-distribution scoring: how far an image's features lie from the training lab's.

The score is the class-conditional Mahalanobis distance of Lee et al. (NeurIPS 2018): the
distance, under one covariance shared by all classes (Ledoit-Wolf shrinkage), from the
image's pre-logit features to the nearest class mean of the training images. It is divided
by the distance below which a chosen quantile (99%) of the training lab's own held-out
validation images fall, so a score above 1 means "farther than 99% of the lab's own cells".

A network's confidence says nothing here: the shipped model stays ~99% confident on other
labs' cells that it gets wrong half the time. Measured on the shipped model
(docs/experiments.md, cross-lab): Mahalanobis AUROC 0.991 against Jiangxi Tecom crops and
0.998 against Raabin field crops, where the maximum softmax probability gets 0.939 / 0.924.

:class:`ShiftHead` is a small torch module, so it is exported into the ONNX graph beside the
classifier (an ``ood_score`` output) and travels with the model file.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .ood import OOD_THRESHOLD, batch_shift, out_of_distribution

SHIFT_FILE = "shift.safetensors"
__all__ = ["OOD_THRESHOLD", "SHIFT_FILE", "ShiftHead", "batch_shift", "fit_shift_head", "out_of_distribution"]


class ShiftHead(nn.Module):
    """Features (N, D) -> out-of-distribution score (N,): Mahalanobis distance to the nearest class mean / threshold."""

    def __init__(self, means: torch.Tensor, precision: torch.Tensor, threshold: float | torch.Tensor):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float32)
        precision = torch.as_tensor(precision, dtype=torch.float32)
        self.register_buffer("means", means)
        self.register_buffer("precision", precision)
        # (f - m) P (f - m) = f P f - 2 f P m + m P m: the class terms are precomputed.
        self.register_buffer("projected_means", means @ precision)  # (C, D)
        self.register_buffer("mean_norms", (self.projected_means * means).sum(1))  # (C,)
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).reshape(()))

    def squared_distances(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C): the squared Mahalanobis distance of each feature vector to each class mean."""
        features = features.float()
        quadratic = ((features @ self.precision) * features).sum(1, keepdim=True)  # (N, 1)
        cross = features @ self.projected_means.T  # (N, C)
        return (quadratic - 2 * cross + self.mean_norms).clamp(min=0)

    def squared_distance(self, features: torch.Tensor) -> torch.Tensor:
        """(N,): the squared distance to the nearest class mean."""
        return self.squared_distances(features).min(1).values

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.squared_distance(features) / self.threshold)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"means": self.means, "precision": self.precision, "threshold": self.threshold}

    def with_means(self, extra_means: torch.Tensor) -> ShiftHead:
        """The same covariance and threshold, with more class centres (a lab's own cells after adaptation)."""
        return ShiftHead(torch.cat([self.means, torch.as_tensor(extra_means, dtype=torch.float32)]), self.precision,
                         self.threshold)


class ClassifierWithShift(nn.Module):
    """uint8 images -> (class logits, out-of-distribution scores): what the exported ONNX graph computes."""

    def __init__(self, classifier: nn.Module, head: ShiftHead):
        super().__init__()
        self.classifier = classifier
        self.head = head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.classifier.features(images)
        return self.classifier.classify(features), self.head(features)


def fit_shift_head(features: np.ndarray, labels: np.ndarray, val_features: np.ndarray, quantile: float = 0.99) -> ShiftHead:
    """Class means and a shared Ledoit-Wolf covariance from training features; the threshold from validation.

    ``features`` (N, D) and ``labels`` (N,) are the training images'; ``val_features`` are held-out
    images of the same lab, whose ``quantile`` of squared distances becomes the threshold.
    """
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    head = ShiftHead(torch.from_numpy(means), torch.from_numpy(precision), 1.0)
    with torch.no_grad():
        distances = head.squared_distance(torch.as_tensor(np.asarray(val_features), dtype=torch.float32)).numpy()
    threshold = float(np.quantile(distances, quantile)) if len(distances) else 1.0
    return ShiftHead(head.means, head.precision, max(threshold, 1e-6))
