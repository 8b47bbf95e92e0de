"""Evaluation: score a trained model on any dataset bloodcell reads.

``evaluate_model(model, data, out)`` writes ``metrics.json``, ``predictions.csv``,
``confusion_matrix.png`` and ``reliability.png``; with ``corruptions=True`` it also scores
every corruption family at five severities (:mod:`.robustness`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from ..core.errors import BloodcellError
from ..data import Source, evaluation_source
from ..data.splits import load_split
from ..inference import Predictor, load_predictor
from ..models.ood import batch_shift, out_of_distribution
from .metrics import abstain_table, compute_metrics
from .plots import plot_confusion, plot_corruption_heatmap, plot_reliability
from .robustness import corruption_accuracy
from .scoring import backend_scores


def load_eval_images(data: str | Path, predictor: Predictor) -> tuple[torch.Tensor, np.ndarray, list[str], Source]:
    """The evaluation images (a split dataset's test split) at the model's size, labels in the model's classes."""
    source = evaluation_source(data)
    names = predictor.class_names
    unknown = [c for c in source.class_names if c not in names]
    if unknown:
        raise BloodcellError(f"{source.root}: class(es) {', '.join(unknown)} unknown to the model "
                             f"(it knows {', '.join(names)})")
    split = load_split(source, names, predictor.image_size, framing=predictor.framing)
    return split.images, split.labels.numpy(), split.paths, source


def write_predictions_csv(path: Path, paths: list[str], labels: np.ndarray, probs: np.ndarray, names: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "pred", "confidence", *names])
        for file, label, row in zip(paths, labels, probs):
            writer.writerow([file, names[label], names[int(row.argmax())], f"{row.max():.6f}",
                             *[f"{p:.6f}" for p in row]])


def evaluate_model(model_path: str | Path, data: str | Path, out: str | Path, corruptions: bool = False,
                   tta: bool = False, seed: int = 0, families: list[str] | None = None,
                   corruption_limit: int | None = None) -> dict:
    """Score ``model_path`` on ``data``; ``corruption_limit`` scores corruptions on a seeded subset."""
    out = Path(out)
    predictor = load_predictor(model_path)  # a run, a checkpoint, an .onnx file or 'default'
    images, labels, paths, source = load_eval_images(data, predictor)
    temperature = float(predictor.temperature)
    logits, ood = backend_scores(predictor, images, tta=tta)
    probs = predictor.softmax(logits.numpy(), ood)  # the temperature, and the shift's where the contract has one
    names = predictor.class_names
    result = compute_metrics(labels, probs, names)
    result = {**{k: result[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "top2_accuracy", "ece")},
              **result, "temperature": temperature, "tta": tta, "model": str(model_path), "data": str(data)}
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out / "predictions.csv", paths, labels, probs, names)
    result["abstain"] = abstain_table(probs, labels)
    if ood is not None:
        # Is this data like the training lab's? The batch verdict, and accuracy on the images it calls familiar.
        shift = batch_shift(ood)
        familiar = ~out_of_distribution(ood)
        shift["accuracy_in_distribution"] = (float((probs[familiar].argmax(1) == labels[familiar]).mean())
                                             if familiar.any() else None)
        result["domain_shift"] = shift
    result["out"] = str(out)
    plot_confusion(np.array(result["confusion_matrix"]["matrix"]), names, out / "confusion_matrix.png")
    plot_reliability(probs, labels, out / "reliability.png")
    if corruptions:
        result["corruptions"] = corruption_accuracy(predictor, source, paths, labels, seed, families,
                                                    corruption_limit, tta)
        plot_corruption_heatmap(result["corruptions"]["accuracy"], out / "corruptions.png")
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
