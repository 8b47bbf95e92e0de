"""Evaluation figures: confusion matrices, reliability diagram, corruption heat map, two runs compared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .metrics import expected_calibration_error


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path, title: str = "",
                   rows: list[str] | None = None) -> None:
    """Counts and row-normalised recall; ``rows`` names the true classes where they differ from the
    answers (``class_names``, the columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(class_names) if rows is None else rows
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    totals = confusion.sum(1, keepdims=True)
    normalised = np.divide(confusion, totals, out=np.zeros_like(confusion, dtype=float), where=totals > 0)
    for ax, values, label in ((axes[0], confusion, "counts"), (axes[1], normalised, "row-normalised (recall)")):
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(rows)):
            for j in range(len(class_names)):
                text = f"{values[i, j]:d}" if values.dtype.kind == "i" else f"{values[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if normalised[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} {label}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(probs: np.ndarray, labels: np.ndarray, path: Path, bins: int = 15) -> None:
    import matplotlib.pyplot as plt

    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    centres, accuracy, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            centres.append((lo + hi) / 2)
            accuracy.append(correct[inside].mean())
            counts.append(inside.sum())
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.bar(centres, accuracy, width=1 / bins, edgecolor="k", alpha=0.7, label="accuracy in bin")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {expected_calibration_error(probs, labels):.3%})")
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_corruption_heatmap(table: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib.pyplot as plt

    families = list(table)
    values = np.array([[table[f][str(s)] for s in range(1, 6)] for f in families])
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(families) + 1.2))
    ax.imshow(values, cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
    for i in range(len(families)):
        for j in range(5):
            ax.text(j, i, f"{values[i, j]:.1%}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(5), [f"severity {s}" for s in range(1, 6)], fontsize=8)
    ax.set_yticks(range(len(families)), families, fontsize=8)
    ax.set_title("Accuracy under corruption")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def compare_runs(first: dict, second: dict, names: list[str], out: Path) -> dict:
    """Per-class recall change between two evaluations, and both confusion matrices side by side."""
    import matplotlib.pyplot as plt

    change = {c: second["per_class"][c]["recall"] - first["per_class"][c]["recall"] for c in names}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    for ax, result, title in ((axes[0], first, first["model"]), (axes[1], second, second["model"])):
        matrix = np.array(result["confusion_matrix"]["matrix"])
        rows = matrix.sum(1, keepdims=True)
        normalised = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if normalised[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(f"{Path(title).name}: accuracy {result['accuracy']:.3f}", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)
    summary = {"first": first["model"], "second": second["model"], "recall_change": change,
               "accuracy_change": second["accuracy"] - first["accuracy"],
               "macro_f1_change": second["macro_f1"] - first["macro_f1"]}
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    return summary
