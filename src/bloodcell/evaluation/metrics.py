"""Metrics: one macro-F1, accuracy, balanced accuracy, calibration error, abstention."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def macro_f1(confusion: torch.Tensor) -> float:
    """Macro-F1 over the classes present, from a confusion matrix (rows: true, columns: predicted).

    The same figure as scikit-learn's ``f1_score(average="macro", labels=present)`` (tested);
    training computes it from the confusion matrix it accumulates across processes.
    """
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).double().clamp_min(1)
    recall = tp / confusion.sum(1).double().clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    present = confusion.sum(1) > 0
    return float(f1[present].mean()) if present.any() else 0.0


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    return calibration_error(probs.max(1), probs.argmax(1) == labels, bins)


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE of answers given with ``confidence``, right where ``correct`` (equal-width bins)."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def compute_metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """accuracy, balanced accuracy, macro-F1 (over classes present), top-2, ECE, per class, confusion."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    pred = probs.argmax(1)
    present = sorted(set(labels.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=list(range(len(class_names))), zero_division=0)
    top2 = np.argsort(-probs, axis=1)[:, :2]
    with warnings.catch_warnings():  # a lab's set holds some classes; answers naming others are errors, not news
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(labels, pred))  # mean recall over the classes present
    return {
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(labels, pred, labels=present, average="macro", zero_division=0)),
        "top2_accuracy": float((top2 == labels[:, None]).any(1).mean()),
        "ece": expected_calibration_error(probs, labels),
        "mean_confidence": float(probs.max(1).mean()),
        "count": int(len(labels)),
        "classes_present": [class_names[i] for i in present],
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": {"classes": class_names,
                             "matrix": confusion_matrix(labels, pred, labels=list(range(len(class_names)))).tolist()},
    }


def abstain_table(probs: np.ndarray, labels: np.ndarray,
                  thresholds: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)) -> list[dict]:
    """Accuracy on the cells kept when those below a confidence threshold go to a person."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    rows = []
    for threshold in thresholds:
        kept = confidence >= threshold
        rows.append({"threshold": threshold, "coverage": float(kept.mean()),
                     "accuracy": float(correct[kept].mean()) if kept.any() else float("nan")})
    return rows
