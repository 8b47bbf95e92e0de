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
from ..data.fields import (
    KINDS,
    Boxes,
    FieldItem,
    load_field,
    open_fields,
    read_kinds,
    read_label_fixes,
)
from ..inference.count import FieldCounter, FieldResult, fields_of_view, square_crop
from ..inference.detect import Detections, box_iou
from ..models.ood import batch_shift
from .detection import detection_metrics
from .metrics import calibration_error
from .plots import plot_confusion

NOT_FOUND = "not found"
WHITE = KINDS.index("white_cell")
REVIEW_FILE = "boxes_to_review.csv"
REVIEW_SHEET = "boxes_to_review.png"
FIXES_FILE = "label_fixes.json"
FIXES_ABOUT = ("Each box boxes_to_review.csv lists: a kind to check (line: the label file's line) given the kind "
               "the detector found there, and a cell no box labels (no line) added as the detector found it. Read "
               "each on its field; delete the entries where the labels are right (and correct 'kind' where neither "
               "is), then pass this file to `bloodcell evaluate --label-fixes` or `bloodcell train-detector "
               "--label-fixes`. The label files are never changed.")
REVIEW_CONTEXT = 2.0  # each box drawn in a square twice its longer side
# A box's kind is doubted when the detector finds another kind on it at this score or more (and its own
# kind not at its threshold); a cell no box labels is listed from this score. Measured on the Raabin
# fields (docs/experiments.md, twenty-fifth session): 0.5 lists the 6 swapped test boxes read by eye.
REVIEW_KIND_SCORE = 0.5
REVIEW_UNLABELLED_SCORE = 0.6


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


def boxes_to_review(found: list[Detections], truth: list[Boxes], names: list[str], thresholds: list[float],
                    kind_score: float = REVIEW_KIND_SCORE, unlabelled_score: float = REVIEW_UNLABELLED_SCORE,
                    iou: float = 0.5) -> list[dict]:
    """Boxes of a lab's field set worth a second look, most doubtful first: the labels' own errors, which
    otherwise count against the detector.

    - ``kind``: a labelled box on which the detector finds another kind scoring ``kind_score`` or more
      (IoU >= ``iou``) and its labelled kind at no score above that kind's threshold: a red cell
      labelled as a white cell, or the reverse (the public Raabin fields hold such swaps);
    - ``unlabelled``: a cell the detector finds at ``unlabelled_score`` or more that no box (of any
      kind, nor one left out) overlaps by IoU 0.3: a cell the labels may have left out.

    ``found``: each field's detections, from a low threshold; ``thresholds``: the detector's own per kind.
    Each row: image, issue, the box, what the label says (its kind, or its white-cell type), what the
    detector says (kind and score) and, for a ``kind`` row of a YOLO label file, the box's line in it.
    """
    rows = []
    for name, det, boxes in zip(names, found, truth):
        kinds, scores = det.boxes.kinds, det.scores
        labelled = np.concatenate([boxes.xyxy, boxes.ignored]) if len(boxes.ignored) else boxes.xyxy
        overlaps = (box_iou(boxes.xyxy, det.boxes.xyxy) if len(boxes) and len(scores)
                    else np.zeros((len(boxes), len(scores)), np.float32))
        for j, (box, kind) in enumerate(zip(boxes.xyxy, boxes.kinds)):
            on = overlaps[j] >= iou
            other = on & (kinds != kind) & (scores >= kind_score)
            if not other.any() or (on & (kinds == kind) & (scores >= thresholds[kind])).any():
                continue
            best = int(np.argmax(np.where(other, scores, -1.0)))
            said = str(boxes.types[j]) if boxes.types is not None and boxes.types[j] else KINDS[kind]
            rows.append({"image": name, "issue": "kind", "box": box, "labelled": said,
                         "detector_kind": KINDS[kinds[best]], "detector_score": float(scores[best]),
                         "line": None if boxes.lines is None else int(boxes.lines[j])})
        free = (box_iou(det.boxes.xyxy, labelled).max(1) < 0.3 if len(labelled) and len(scores)
                else np.ones(len(scores), bool))
        for i in np.flatnonzero(free & (scores >= unlabelled_score)):
            rows.append({"image": name, "issue": "unlabelled", "box": det.boxes.xyxy[i], "labelled": "",
                         "detector_kind": KINDS[kinds[i]], "detector_score": float(scores[i]), "line": None})
    return sorted(rows, key=lambda r: -r["detector_score"])


def write_review(path: Path, rows: list[dict]) -> None:
    """``boxes_to_review.csv``: one row per box of :func:`boxes_to_review`, boxes in the image's pixels."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "issue", "x0", "y0", "x1", "y1", "labelled", "detector_kind", "detector_score", "line"])
        for r in rows:
            writer.writerow([r["image"], r["issue"], *(f"{v:.1f}" for v in r["box"]), r["labelled"], r["detector_kind"],
                             f"{r['detector_score']:.4f}", "" if r.get("line") is None else r["line"]])


def suggested_fixes(rows: list[dict], items: list[FieldItem], root: Path) -> list[dict]:
    """:func:`boxes_to_review`'s rows as label fixes, for the lab to read by eye (deleting the ones where the
    label is right) and pass to ``--label-fixes``, in the format :func:`bloodcell.data.fields.read_label_fixes`
    reads: a ``kind`` row gives its line the detector's kind, an ``unlabelled`` row adds the detector's box
    (where the field has a YOLO label file). A line a fix already corrects is left out."""
    from PIL import Image

    by_image = {str(item.image): item for item in items}
    fixes = []
    for r in rows:
        item = by_image.get(r["image"])
        if item is None or item.labels is None or item.labels.suffix != ".txt":
            continue
        try:
            name = item.labels.relative_to(root).as_posix()
        except ValueError:
            name = str(item.labels)
        said = f"the detector's {r['detector_kind']} at {r['detector_score']:.2f}: not yet read by eye"
        if r["issue"] == "kind" and r.get("line") and not any(fix.line == r["line"] for fix in item.fixes):
            fixes.append({"label_file": name, "line": r["line"],
                          "reads": item.labels.read_text().splitlines()[r["line"] - 1].strip(),
                          "labelled": r["labelled"], "kind": r["detector_kind"], "seen": said})
        elif r["issue"] == "unlabelled":
            with Image.open(item.image) as image:
                width, height = image.size
            x0, y0, x1, y1 = (float(v) for v in r["box"])
            fixes.append({"label_file": name, "kind": r["detector_kind"],
                          "box": [round((x0 + x1) / 2 / width, 6), round((y0 + y1) / 2 / height, 6),
                                  round((x1 - x0) / width, 6), round((y1 - y0) / height, 6)], "seen": said})
    return fixes


def write_review_sheet(path: Path, rows: list[dict], limit: int = 48, tile: int = 160) -> int:
    """``boxes_to_review.png``: the first ``limit`` rows of :func:`boxes_to_review` side by side, each box
    drawn in its surroundings and captioned with what the label and the detector say. Returns the tiles drawn."""
    from PIL import Image, ImageDraw

    from ..data.sources import decode_file

    tiles = []
    for row in rows[:limit]:
        try:
            image = decode_file(row["image"])[0]
        except (ImageReadError, BloodcellError):
            continue
        x0, y0, x1, y1 = (float(v) for v in row["box"])
        side = max(x1 - x0, y1 - y0)
        # the box at the centre of a square twice its longer side, as count's crops are cut
        crop = Image.fromarray(square_crop(image, row["box"], REVIEW_CONTEXT)).resize((tile, tile))
        scale = tile / max(2, round(side * REVIEW_CONTEXT))
        half_w, half_h = (x1 - x0) / 2 * scale, (y1 - y0) / 2 * scale
        card = Image.new("RGB", (tile, tile + 30), "white")
        card.paste(crop, (0, 0))
        draw = ImageDraw.Draw(card)
        draw.rectangle([tile / 2 - half_w, tile / 2 - half_h, tile / 2 + half_w, tile / 2 + half_h],
                       outline=(230, 0, 0), width=2)
        said = f"label {row['labelled']}" if row["issue"] == "kind" else "no label"
        draw.text((3, tile + 2), f"{said}; found", fill=(0, 0, 0))
        draw.text((3, tile + 15), f"{row['detector_kind']} {row['detector_score']:.2f}  {Path(row['image']).stem[:10]}",
                  fill=(0, 0, 0))
        tiles.append(card)
    if tiles:
        columns = min(8, len(tiles))
        sheet = Image.new("RGB", (columns * tile, -(-len(tiles) // columns) * (tile + 30)), "white")
        for i, card in enumerate(tiles):
            sheet.paste(card, ((i % columns) * tile, (i // columns) * (tile + 30)))
        sheet.save(path)
    return len(tiles)


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
                       split: str | None = None, abstain_below: float = 0.7, skip_unknown: bool = False,
                       label_fixes: str | Path | None = None) -> dict:
    """Score the detector and the classifier on a boxed field set (``split``: one of its splits; None: all
    of it). Writes ``metrics.json``, ``cells.csv`` (every cell found, with the lab's type of the box it
    matched), ``boxes_to_review.csv`` (:func:`boxes_to_review`) with ``boxes_to_review.png`` (the first 48
    of them, drawn) and, where the set types its white cells,
    ``confusion_matrix.png``.

    ``skip_unknown``: boxes of classes that are neither a kind nor a white-cell type (smudge cells,
    blasts...) are left out instead of refused: a detection on one counts neither way, and
    ``metrics.json`` lists them (``left_out``: boxes per class).

    ``label_fixes``: a JSON list of label fixes (kinds corrected, boxes dropped or added) (:func:`bloodcell.data.fields.read_label_fixes`),
    applied as the labels are read; the label files are not changed."""
    from ..inference import load_predictor
    from ..inference.detect import load_detector

    data, out = Path(data), Path(out)
    names = read_kinds(data, skip_unknown)
    items = open_fields(data, split, read_label_fixes(label_fixes, data) if label_fixes else None)
    counter = FieldCounter(load_detector(detector), load_predictor(model_path), abstain_below)
    fields = [(str(item.image), (lambda item=item: load_field(item, names, skip_unknown))) for item in items]
    results, truth, ranked, unreadable = score_fields(counter, fields)
    if not results:
        raise BloodcellError(f"{data}: none of its {len(items)} fields could be read")
    contract = counter.detector.contract
    result = {"model": str(model_path), "detector": str(detector), "data": str(data), "split": split or "all",
              "fields": len(results), "unreadable": unreadable,
              **({"label_fixes": {"file": str(label_fixes), "lines": sum(len(item.fixes) for item in items)}}
                 if label_fixes else {}),
              "detection": detection_metrics(ranked, truth, operating=contract.operating()),
              "fields_magnified": sum(1 for r in results if r.magnification > 1)}
    review = boxes_to_review(ranked, truth, [r.name for r in results], contract.thresholds())
    result["review"] = {"file": REVIEW_FILE, **{issue: sum(r["issue"] == issue for r in review)
                                                for issue in ("kind", "unlabelled")}}
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
    write_review(out / REVIEW_FILE, review)
    fixes = suggested_fixes(review, items, data)
    if fixes:
        (out / FIXES_FILE).write_text(json.dumps({"about": FIXES_ABOUT, "fixes": fixes}, indent=1))
        result["review"]["label_fixes"] = FIXES_FILE
    if write_review_sheet(out / REVIEW_SHEET, review):
        result["review"]["sheet"] = REVIEW_SHEET
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
