"""Scoring the whole field path on a lab's boxed fields: the detector per kind, and the classifier on
the white cells it found, where the lab has typed them.

A boxed field set is read by :mod:`bloodcell.data.fields` (YOLO's layout; class names that are
kinds, or white-cell types such as ``neutrophil``). Each field goes through ``bloodcell
count``'s path once, with detections kept down to a score of 0.05 so that AP50 ranks them all
(:func:`bloodcell.evaluation.detection.detection_metrics`); the cells above the detector's own
thresholds are then typed as ``count`` types them.

The white-cell types are scored on the lab's typed boxes. Each typed box is matched to the
best-scoring white cell found over it (IoU >= 0.5, each cell matched once). A typed cell that
is not found counts as wrong: the figure is what a lab gets from its fields, detection and
classification together. The differential compares the lab's own shares of each type with
what ``count`` would report (every white cell found, cells to check left out).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np

from ..core.errors import BloodcellError, ImageReadError
from ..data.fields import KINDS, Boxes, load_field, open_fields, read_kinds
from ..inference.count import FieldCounter, FieldResult, fields_of_view
from ..inference.detect import Detections, box_iou
from ..models.ood import batch_shift
from .detection import detection_metrics
from .metrics import calibration_error
from .plots import plot_confusion

NOT_FOUND = "not found"
WHITE = KINDS.index("white_cell")


def at_operating(found: Detections, thresholds: list[float]) -> Detections:
    """The detections scoring at least their kind's threshold (``DetectorContract.thresholds()``)."""
    keep = found.scores >= np.asarray(thresholds, np.float32)[found.boxes.kinds]
    return Detections(found.boxes.select(keep), found.scores[keep], found.magnification)


def match_white_cells(cells: list[dict], truth: Boxes, iou: float = 0.5) -> list[int | None]:
    """For each true white-cell box of ``truth`` (in order), the index into ``cells`` of the white cell
    matched to it, or None. Cells are taken best score first; each takes the free true box it overlaps most."""
    white = np.flatnonzero(truth.kinds == WHITE)
    matched: list[int | None] = [None] * len(white)
    found = [i for i, c in enumerate(cells) if c["kind"] == "white_cell"]
    if not len(white) or not found:
        return matched
    found.sort(key=lambda i: -float(cells[i]["score"]))
    boxes = np.array([[cells[i][k] for k in ("x0", "y0", "x1", "y1")] for i in found], np.float32)
    overlaps = box_iou(boxes, truth.xyxy[white])
    for row, index in enumerate(found):
        free = np.array([m is None for m in matched])
        candidates = np.where(free, overlaps[row], -1.0)
        best = int(np.argmax(candidates))
        if candidates[best] >= iou:
            matched[best] = index
    return matched


def type_metrics(results: list[FieldResult], truth: list[Boxes], class_names: list[str], iou: float = 0.5) -> dict | None:
    """The classifier's answers on the lab's typed white cells (None: the set types none of them)."""
    if not any(t.types is not None and (t.types[t.kinds == WHITE] != "").any() for t in truth):
        return None
    from sklearn.metrics import f1_score

    rows = []  # (true type, answer or NOT_FOUND, to check)
    confidence = []  # of each found cell's answer
    for result, boxes in zip(results, truth):
        if boxes.types is None:
            continue
        types = boxes.types[boxes.kinds == WHITE]
        for kind, index in zip(types, match_white_cells(result.cells, boxes, iou)):
            if kind:
                cell = None if index is None else result.cells[index]
                rows.append((str(kind), NOT_FOUND if cell is None else cell["class"], bool(cell and cell["to_check"])))
                if cell is not None:
                    confidence.append(float(cell["confidence"]))
    present = sorted({t for t, _, _ in rows}, key=lambda n: class_names.index(n) if n in class_names else len(class_names))
    per_class = {}
    for name in present:
        mine = [r for r in rows if r[0] == name]
        per_class[name] = {"cells": len(mine), "found": sum(r[1] != NOT_FOUND for r in mine),
                           "right": sum(r[1] == name for r in mine)}
    found = [r for r in rows if r[1] != NOT_FOUND]
    counted = [r for r in found if not r[2]]
    answers = [*class_names, NOT_FOUND]
    confusion = [[sum(1 for r in rows if r[0] == t and r[1] == a) for a in answers] for t in present]
    # What count would report over these fields (every white cell found, those to check left out) against the lab's own types.
    reported = Counter(c["class"] for r in results for c in r.cells if c["kind"] == "white_cell" and not c["to_check"])
    true_counts = Counter(t for t, _, _ in rows)
    shown = [n for n in class_names if true_counts[n] or reported[n]]
    total_true, total_reported = sum(true_counts.values()), max(sum(reported.values()), 1)
    differential = {n: {"true_share": true_counts[n] / total_true, "counted_share": reported[n] / total_reported}
                    for n in shown}
    return {
        "typed_cells": len(rows),
        "found": len(found),
        "accuracy": sum(r[0] == r[1] for r in rows) / len(rows),
        "balanced_accuracy": float(np.mean([v["right"] / v["cells"] for v in per_class.values()])),
        "macro_f1": float(f1_score([r[0] for r in rows], [r[1] for r in rows], labels=present, average="macro",
                                   zero_division=0)),
        "accuracy_where_found": sum(r[0] == r[1] for r in found) / len(found) if found else None,
        "ece_where_found": calibration_error(confidence, [r[0] == r[1] for r in found]) if found else None,
        "to_check": len(found) - len(counted),
        "accuracy_counted": sum(r[0] == r[1] for r in counted) / len(counted) if counted else None,
        "per_class": per_class,
        "confusion": {"true": present, "answers": answers, "matrix": confusion},
        "differential": differential,
        "differential_max_error": max(abs(v["true_share"] - v["counted_share"]) for v in differential.values()),
    }


def score_fields(counter: FieldCounter, fields, batch_size: int = 8
                 ) -> tuple[list[FieldResult], list[Boxes], list[Detections], list[dict]]:
    """Read ``fields`` (an iterable of (name, loader) where loader() gives (image, truth boxes)) through
    ``count``'s path, keeping every detection down to 0.05 as well.

    Returns the typed cells per field (the detector's own thresholds), the true boxes, the low-threshold
    detections, and the files that could not be read ({"path", "error"}).
    """
    contract = counter.detector.contract
    low = counter.detector.with_contract(contract.lowered())
    thresholds = contract.thresholds()
    results, truth, ranked, unreadable = [], [], [], []
    batch: list[tuple[str, np.ndarray, Boxes]] = []

    def flush():
        views, painted = fields_of_view([image for _, image, _ in batch])
        found = low.detect_batch([image for _, image, _ in batch], views)
        typed = counter.type_cells(painted, [name for name, _, _ in batch], [at_operating(f, thresholds) for f in found])
        results.extend(typed)
        truth.extend(boxes for _, _, boxes in batch)
        ranked.extend(found)
        batch.clear()

    for name, loader in fields:
        try:
            image, boxes = loader()
        except ImageReadError as exc:
            unreadable.append({"path": name, "error": str(exc)})
            continue
        batch.append((name, image, boxes))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return results, truth, ranked, unreadable


def evaluate_field_set(model_path: str | Path, data: str | Path, out: str | Path, detector: str | Path = "default",
                       split: str | None = None, abstain_below: float = 0.7, skip_unknown: bool = False) -> dict:
    """Score the detector and the classifier on a boxed field set (``split``: one of its splits; None: all
    of it). Writes ``metrics.json``, ``cells.csv`` (every cell found, with the lab's type of the box it
    matched) and, where the set types its white cells, ``confusion_matrix.png``.

    ``skip_unknown``: boxes of classes that are neither a kind nor a white-cell type (smudge cells,
    blasts...) are left out instead of refused: a detection on one counts neither way, and
    ``metrics.json`` lists them (``left_out``: boxes per class)."""
    from ..inference import load_predictor
    from ..inference.detect import load_detector

    data, out = Path(data), Path(out)
    names = read_kinds(data, skip_unknown)
    items = open_fields(data, split)
    counter = FieldCounter(load_detector(detector), load_predictor(model_path), abstain_below)
    fields = [(str(item.image), (lambda item=item: load_field(item, names, skip_unknown))) for item in items]
    results, truth, ranked, unreadable = score_fields(counter, fields)
    if not results:
        raise BloodcellError(f"{data}: none of its {len(items)} fields could be read")
    contract = counter.detector.contract
    result = {"model": str(model_path), "detector": str(detector), "data": str(data), "split": split or "all",
              "fields": len(results), "unreadable": unreadable,
              "detection": detection_metrics(ranked, truth, operating=contract.operating()),
              "fields_magnified": sum(1 for r in results if r.magnification > 1)}
    left_out = Counter(name for boxes in truth for name in boxes.ignored_names)
    if left_out:
        result["left_out"] = dict(sorted(left_out.items()))
    types = type_metrics(results, truth, counter.class_names)
    if types is not None:
        result["types"] = types
    ood = [float(c["ood_score"]) for r in results for c in r.cells if c["kind"] == "white_cell" and c["ood_score"] != ""]
    if ood:
        result["domain_shift"] = batch_shift(np.asarray(ood, np.float32))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cells.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "kind", "x0", "y0", "x1", "y1", "score", "class", "confidence", "to_check", "true_type"])
        for res, boxes in zip(results, truth):
            labelled = {}
            if boxes.types is not None:
                types_ = boxes.types[boxes.kinds == WHITE]
                labelled = {i: str(t) for t, i in zip(types_, match_white_cells(res.cells, boxes)) if i is not None}
            for i, c in enumerate(res.cells):
                writer.writerow([res.name, c["kind"], c["x0"], c["y0"], c["x1"], c["y1"], c["score"], c["class"],
                                 c["confidence"], c["to_check"] if c["kind"] == "white_cell" else "", labelled.get(i, "")])
    if types is not None:
        confusion = types["confusion"]
        plot_confusion(np.array(confusion["matrix"]), confusion["answers"], out / "confusion_matrix.png",
                       rows=confusion["true"])
    result["out"] = str(out)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
