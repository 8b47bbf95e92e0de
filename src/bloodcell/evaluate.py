"""Evaluation: metrics, calibration, predictions, confusion matrices and robustness.

``evaluate_model(model, data, out)`` scores a trained model on any dataset
:mod:`bloodcell.data` reads and writes ``metrics.json``, ``predictions.csv``,
``confusion_matrix.png`` and ``reliability.png``; with ``corruptions=True`` it
also scores every corruption family at five severities.
"""

from __future__ import annotations

import csv
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .data import BloodcellError, Source, open_source
from .models import CNNConfig, create_model


# ---------------------------------------------------------------- model


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """A trained classifier from a run directory (its best checkpoint) or a checkpoint file."""
    from .train import load_checkpoint

    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    checkpoint = path / "best.safetensors" if path.is_dir() else path
    if not (run_dir / "model.json").is_file():
        raise BloodcellError(f"{path}: not a bloodcell run (no model.json beside the checkpoint)")
    meta = json.loads((run_dir / "model.json").read_text())
    tensors, _ = load_checkpoint(checkpoint)
    tensors = {k[6:] if k.startswith("model.") else k: v for k, v in tensors.items() if not k.startswith(("optim.", "ema."))}
    cnn = CNNConfig(**meta["cnn"]) if meta.get("cnn") else None
    subclasses = meta.get("subclasses")
    model, _ = create_model(meta["model"], len(meta["class_names"]), pretrained=False, cnn=cnn,
                            subclass_parents=subclasses["parents"] if subclasses else None)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise BloodcellError(f"{checkpoint}: does not fit {meta['model']} ({str(exc).splitlines()[1].strip()})") from None
    model.eval()
    return model, meta


def backend_logits(predictor, images: torch.Tensor, batch_size: int = 128, tta: bool = False) -> torch.Tensor:
    """Logits from any predictor backend (ONNX Runtime or PyTorch) for a uint8 (N, 3, S, S) batch."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        views = [batch]
        if tta:
            views = [torch.rot90(batch, k, dims=(2, 3)) for k in range(4)]
            views += [v.flip(3) for v in views]
        logits = [torch.from_numpy(predictor.run(np.ascontiguousarray(v.numpy()))) for v in views]
        outputs.append(torch.stack(logits).mean(0))
    return torch.cat(outputs)


# ---------------------------------------------------------------- metrics


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
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
    return {
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, labels=present, average="macro", zero_division=0)),
        "top2_accuracy": float((top2 == labels[:, None]).any(1).mean()),
        "ece": expected_calibration_error(probs, labels),
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


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al. 2017), within ``bounds``.

    A grid over log T first, then L-BFGS from the best grid point: L-BFGS alone, started at
    T = 1, diverged to NaN on a barely trained model whose logits carry almost no signal.
    """
    logits, labels = logits.detach().float(), labels.detach()
    criterion = torch.nn.CrossEntropyLoss()
    grid = torch.linspace(math.log(bounds[0]), math.log(bounds[1]), 241)
    with torch.no_grad():
        losses = torch.stack([criterion(logits / t.exp(), labels) for t in grid])
    best = int(torch.nan_to_num(losses, nan=float("inf")).argmin())
    log_t = grid[best].clone().reshape(1).requires_grad_(True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = criterion(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    refined = float(log_t.detach().clamp(math.log(bounds[0]), math.log(bounds[1])).exp())
    with torch.no_grad():
        refined_loss = float(criterion(logits / refined, labels)) if math.isfinite(refined) else float("inf")
    chosen = refined if refined_loss <= float(losses[best]) else float(grid[best].exp())
    return min(max(chosen, bounds[0]), bounds[1])  # exact bounds despite float32 rounding


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


# ---------------------------------------------------------------- data


def load_eval_images(data: str | Path, meta: dict) -> tuple[torch.Tensor, np.ndarray, list[str], Source]:
    """The evaluation images at the model's size, labels mapped to the model's classes."""
    from .train import load_split

    data = Path(data)
    if (data / "images" / "test").is_dir():
        data = data / "images" / "test"
    elif (data / "test.npz").is_file():
        data = data / "test.npz"
    source = open_source(data)
    unknown = [c for c in source.class_names if c not in meta["class_names"]]
    if unknown:
        raise BloodcellError(f"{data}: class(es) {', '.join(unknown)} unknown to the model "
                             f"(it knows {', '.join(meta['class_names'])})")
    split = load_split(source, meta["class_names"], meta["image_size"], framing=meta.get("framing"))
    return split.images, split.labels.numpy(), split.paths, source


# ---------------------------------------------------------------- figures


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    rows = confusion.sum(1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
    for ax, values, label in ((axes[0], confusion, "counts"), (axes[1], normalised, "row-normalised (recall)")):
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                text = f"{values[i, j]:d}" if values.dtype.kind == "i" else f"{values[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if normalised[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
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


# ---------------------------------------------------------------- the command


def evaluate_model(model_path: str | Path, data: str | Path, out: str | Path, corruptions: bool = False,
                   tta: bool = False, seed: int = 0, families: list[str] | None = None,
                   corruption_limit: int | None = None) -> dict:
    """Score ``model_path`` on ``data``; ``corruption_limit`` scores corruptions on a seeded subset."""
    from . import corruptions as corruption_module
    from .data import load_item

    from .predict import load_predictor

    out = Path(out)
    predictor = load_predictor(model_path)  # a run, a checkpoint, an .onnx file or 'default'
    meta = {"class_names": predictor.class_names, "image_size": predictor.image_size, "framing": predictor.framing}
    images, labels, paths, source = load_eval_images(data, meta)
    temperature = float(predictor.temperature)
    logits = backend_logits(predictor, images, tta=tta)
    probs = torch.softmax(logits / temperature, dim=1).numpy()
    names = meta["class_names"]
    result = compute_metrics(labels, probs, names)
    result = {**{k: result[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "top2_accuracy", "ece")},
              **result, "temperature": temperature, "tta": tta, "model": str(model_path), "data": str(data)}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "pred", "confidence", *names])
        for path, label, row in zip(paths, labels, probs):
            writer.writerow([path, names[label], names[int(row.argmax())], f"{row.max():.6f}",
                             *[f"{p:.6f}" for p in row]])
    result["abstain"] = abstain_table(probs, labels)
    result["out"] = str(out)
    plot_confusion(np.array(result["confusion_matrix"]["matrix"]), names, out / "confusion_matrix.png")
    plot_reliability(probs, labels, out / "reliability.png")
    if corruptions:
        table: dict[str, dict[str, float]] = {}
        items = {item.path: item for item in source.items}
        subset = np.arange(len(paths))
        if corruption_limit is not None and corruption_limit < len(paths):
            subset = np.sort(np.random.default_rng(seed).choice(len(paths), corruption_limit, replace=False))
        originals = [load_item(source, items[paths[i]])[0] for i in subset]
        subset_labels = labels[subset]
        def corrupted_batch(family: str, severity: int) -> torch.Tensor:
            # Each image's corruption is seeded by its index, so the pool's order changes nothing;
            # NumPy, SciPy and Pillow release the GIL for most of corrupting and framing.
            def one(k: int) -> np.ndarray:
                return predictor.prepare(corruption_module.corrupt(originals[k], family, severity, seed + k))

            corrupted = np.stack(list(pool.map(one, range(len(originals)), chunksize=32)))
            return torch.from_numpy(corrupted).permute(0, 3, 1, 2).contiguous()

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for family in families or list(corruption_module.CORRUPTIONS):
                table[family] = {}
                for severity in corruption_module.SEVERITIES:
                    pred = backend_logits(predictor, corrupted_batch(family, severity), tta=tta).argmax(1).numpy()
                    table[family][str(severity)] = float((pred == subset_labels).mean())
        means = {f: float(np.mean(list(v.values()))) for f, v in table.items()}
        result["corruptions"] = {"accuracy": table, "family_mean": means,
                                 "mean": float(np.mean([v for f in table.values() for v in f.values()])),
                                 "seed": seed, "images": int(len(subset))}
        plot_corruption_heatmap(table, out / "corruptions.png")
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
