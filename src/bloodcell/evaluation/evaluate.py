"""Evaluation: score a trained model on any dataset bloodcell reads.

``evaluate_model(model, data, out)`` writes ``metrics.json``, ``predictions.csv``,
``confusion_matrix.png`` and ``reliability.png``; with ``corruptions=True`` it also scores
every corruption family at five severities (:mod:`.robustness`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..core.errors import BloodcellError
from ..data import Source, evaluation_source
from ..data.splits import Split, load_split
from ..inference import Predictor, load_predictor
from ..models.ood import batch_shift, out_of_distribution
from .metrics import abstain_table, compute_metrics
from .plots import plot_confusion, plot_corruption_heatmap, plot_reliability
from .robustness import corruption_accuracy
from .scoring import backend_scores

if TYPE_CHECKING:
    from ..inference.detect import CellDetector


def model_source(data: str | Path, predictor: Predictor, skip_unknown: bool = False) -> Source:
    """What ``predictor`` is scored on (a split dataset's test split), labelled in its classes; a class
    folder naming none of them is refused, or with ``skip_unknown`` left out (``Source.ignored``)."""
    return evaluation_source(data, list(predictor.class_names), skip_unknown)


def eval_split(data: str | Path, predictor: Predictor, skip_unknown: bool = False,
               source: Source | None = None) -> tuple[Split, Source]:
    """The evaluation images (a split dataset's test split; ``source``, when already listed) at the model's size,
    labels in the model's classes, and unreadable files listed (``Split.unreadable``)."""
    source = source if source is not None else model_source(data, predictor, skip_unknown)
    return load_split(source, predictor.class_names, predictor.image_size, framing=predictor.framing), source


def load_eval_images(data: str | Path, predictor: Predictor,
                     skip_unknown: bool = False) -> tuple[torch.Tensor, np.ndarray, list[str], Source]:
    """The evaluation images (a split dataset's test split) at the model's size, labels in the model's classes."""
    split, source = eval_split(data, predictor, skip_unknown)
    return split.images, split.labels.numpy(), split.paths, source


@dataclass
class FieldCells:
    """Where each evaluated field's white cell was found: its box in the field's pixels and the detector's score."""

    boxes: list[tuple[float, float, float, float] | None]  # None: no white cell found (the whole field was scored)
    scores: list[float | None]
    unreadable: list[dict] = field(default_factory=list)  # {"path", "error"} of files left out


def load_field_eval_images(data: str | Path, predictor: Predictor, detector: str | Path | CellDetector = "default",
                           batch_size: int = 16, skip_unknown: bool = False) -> tuple[torch.Tensor, np.ndarray, list[str], Source, FieldCells]:
    """Like :func:`load_eval_images`, for whole fields holding one white cell each (labelled by their folder).

    Each field goes through ``bloodcell count``'s path: the cell detector finds the white cells, the
    most confident one is cut out as count cuts it (:func:`bloodcell.inference.count.square_crop`)
    and prepared through the model's own preprocessing. A field where none is found is scored
    whole, as plain evaluation would, and counted in the report.
    """
    from ..inference.count import source_white_cells
    from ..inference.detect import load_detector

    source = model_source(data, predictor, skip_unknown)
    images, labels, paths, boxes, scores, unreadable = [], [], [], [], [], []
    for item, cut in source_white_cells(source, load_detector(detector), batch_size):  # as count cuts them
        if isinstance(cut, Exception):  # left out and listed, as curation lists such files
            unreadable.append({"path": item.path, "error": str(cut)})
            continue
        crop, box, score = cut
        boxes.append(None if box is None else tuple(round(float(v), 1) for v in box))
        scores.append(None if score is None else round(score, 4))
        images.append(torch.from_numpy(np.array(predictor.prepare(crop))).permute(2, 0, 1))
        labels.append(item.label)  # model_source labels in the model's classes
        paths.append(item.path)
    if not images:
        raise BloodcellError(f"{source.root}: no readable images")
    return torch.stack(images), np.array(labels, dtype=np.int64), paths, source, FieldCells(boxes, scores, unreadable)


def write_predictions_csv(path: Path, paths: list[str], labels: np.ndarray, probs: np.ndarray, names: list[str],
                          cells: FieldCells | None = None) -> None:
    """One row per image; with ``cells`` (whole fields), the white cell's box and detector score too (empty: none found)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "pred", "confidence", *names,
                         *(["x0", "y0", "x1", "y1", "box_score"] if cells else [])])
        for index, (file, label, row) in enumerate(zip(paths, labels, probs)):
            extra = []
            if cells:
                box = cells.boxes[index]
                extra = [*(box if box else ("",) * 4), "" if cells.scores[index] is None else cells.scores[index]]
            writer.writerow([file, names[label], names[int(row.argmax())], f"{row.max():.6f}",
                             *[f"{p:.6f}" for p in row], *extra])


def evaluate_model(model_path: str | Path, data: str | Path, out: str | Path, corruptions: bool = False,
                   tta: bool = False, seed: int = 0, families: list[str] | None = None,
                   corruption_limit: int | None = None, fields: bool | None = None,
                   detector: str | Path | CellDetector = "default", check_fields: bool = False, skip_unknown: bool = False) -> dict:
    """Score ``model_path`` on ``data``; ``corruption_limit`` scores corruptions on a seeded subset.

    ``skip_unknown``: class folders naming none of the model's classes are left out (``left_out`` in
    the result: folder -> files) instead of refused.

    ``fields``: True, the images are whole fields with one white cell each, found by ``detector``
    and cut out as ``bloodcell count`` cuts them (:func:`load_field_eval_images`); False, they are
    single-cell crops; None (``bloodcell evaluate``'s default), up to 16 of them are looked at with
    the detector first, and they are read as fields when half or more are
    (:func:`bloodcell.inference.count.mostly_fields`; ``field_like`` and ``read_as`` in the result).
    A classifier of crops would frame a whole field as if it were one cell. ``check_fields``: with
    ``fields=False``, still look, and report in ``field_like`` how many are whole fields.
    """
    out = Path(out)
    if fields and corruptions:
        raise BloodcellError("--corruptions scores single-cell crops; leave it out with --fields")
    predictor = load_predictor(model_path)  # a run, a checkpoint, an .onnx file or 'default'
    field_like = source = None
    finder = detector
    if fields is None:
        from ..inference.count import count_field_like, mostly_fields
        from ..inference.detect import load_once

        source = model_source(data, predictor, skip_unknown)
        if source.items:
            finder = load_once(detector)  # for the look and, if they are fields, the reading
        field_like = count_field_like([item.path for item in source.items], finder)
        # corrupted copies are of crops: a set of fields is then scored as crops (and said so)
        fields = not corruptions and mostly_fields(field_like)
    cells = None
    if fields:
        images, labels, paths, source, cells = load_field_eval_images(data, predictor, finder,
                                                                      skip_unknown=skip_unknown)
        unreadable = cells.unreadable
    else:
        split, source = eval_split(data, predictor, skip_unknown, source)
        images, labels, paths = split.images, split.labels.numpy(), split.paths
        unreadable = [{"path": path, "error": why} for path, why in split.unreadable]
    temperature = float(predictor.temperature)
    logits, ood = backend_scores(predictor, images, tta=tta)
    probs = predictor.softmax(logits.numpy(), ood)  # the temperature, and the shift's where the contract has one
    names = predictor.class_names
    result = compute_metrics(labels, probs, names)
    result = {**{k: result[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "top2_accuracy", "ece")},
              **result, "temperature": temperature, "tta": tta, "model": str(model_path), "data": str(data)}
    if source.renamed:
        result["class_folders"] = source.renamed  # 'Neutrophils' read as neutrophil
    if source.ignored:
        result["left_out"] = source.ignored  # folders of classes the model does not know: files in each
    result["unreadable"] = unreadable  # files left out, each with the reason: nothing is dropped silently
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out / "predictions.csv", paths, labels, probs, names, cells)
    if field_like is None and cells is None and check_fields:
        from ..inference.count import count_field_like

        field_like = count_field_like(paths)  # are these whole fields, framed here as if each were one cell?
    if field_like is not None:
        result["field_like"] = {"whole_fields": field_like[0], "images_looked_at": field_like[1]}
    result["read_as"] = "fields" if cells is not None else "cells"
    if cells is not None:
        found = np.array([box is not None for box in cells.boxes])
        result["fields"] = {"detector": str(detector), "images": len(found),
                            "white_cell_found": int(found.sum()),
                            "accuracy_where_found": float((probs[found].argmax(1) == labels[found]).mean()) if found.any() else None,
                            "unreadable": cells.unreadable}
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
