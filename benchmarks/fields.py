"""Whole fields: the cell detector's AP50 per kind, a classical baseline beside it, speed, and crop framing.

    .venv/bin/python benchmarks/fields.py [--detector default] [--model default] [--data FIELDS]
                                          [--split test] [--pbc-test CURATED] [--speed-fields 100]
                                          [--out benchmarks/results/fields.json]

Reports, on the ``--split`` fields of ``--data`` (default ``$BLOODCELL_DATA/fields``; any layout
``bloodcell.data.fields`` reads, a set without splits read whole):

- the detector: AP50 per kind (and for white cells not cut by the field's edge) (PASCAL VOC, all points, IoU 0.5) from detections down to a
  score of 0.05, and recall and precision at its own threshold; and ``found``, the recall with a
  detection matched at IoU 0.3, whatever the box convention (a white cell's nucleus or the whole cell);
- the same fields as another lab might photograph them: 300 px and 1,600 px wide, stretched to
  640x480, a half, a third and a quarter of the magnification (2 x 2, 3 x 3 and 4 x 4 fields side
  by side, resized to one field), a third in a sparse field (shrunk into a corner of a canvas of
  its colour), a crowded 640x480 field at 0.6 of the magnification (a window of 3 x 3 fields, as a
  lower-power objective shows a smear), a purple stain cast, a yellow lamp, out of focus, through
  the eyepiece (a phone's photo: twice the pixels in a round aperture, a dark 4:3 frame; each box
  clipped to what the aperture shows, as a field's edge cuts its cells); the
  third, quarter, sparse third and crowded 0.6 again without the detector's red-cell ruler
  (``*_no_ruler``), to show what it changes; the crowded field also on whole cells only
  (``crowded_0.6_whole_cells``): the mosaic puts the source fields' edge slivers on its inner
  seams, where no lab's field has them, so they are scored as VOC's "difficult" boxes;
- where the set types its white cells (class names such as ``neutrophil``): the classifier's type
  accuracy on the cells found (``--model``), misses counted as wrong, and the differential against
  the lab's own;
- the classical baseline: stain thresholding, distance transform and watershed (scipy only),
  scored the same way;
- fields/s of ``bloodcell count``'s path (decode, detect, crop and classify every white cell,
  no overlays or report) on fields resized to 640x480 JPEGs, with ONNX Runtime on this machine's cores; and
  the same on the crowded fields at 0.6 of the magnification (``speed_crowded``);
- crop framing: the median ratio of a PBC image's side to the white-cell box the detector finds
  in it (``CROP_CONTEXT`` in ``bloodcell.inference.count``), and, on the PBC test split
  (``--pbc-test``: a curated folder, its ``images/test``) used as one-cell "fields", the class
  accuracy through ``count`` against ``predict`` on the same images; on those images (another
  lab's smears to the detector), the white-cell boxes away from the central cell with and
  without the nucleus rule (``white_cell_min_stain``), and how often a platelet image's centre
  is called a white cell.

The Raabin fields' labels are read through ``fields_label_fixes.json`` (boxes of the wrong kind and
boxes left out, listed by ``bloodcell evaluate``'s review and read by eye; the scored split's own fixes
apply: 6 kinds on test, 5 on val; the training split's are for ``train-detector --label-fixes``);
``learned_as_labelled`` gives the headline figures against the labels as they are, and
``--labels-as-given`` scores everything so.

Writes JSON (the machine's CPU included) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

HERE = Path(__file__).resolve().parent
LABEL_FIXES = HERE / "fields_label_fixes.json"
# a box less in sight than this share (cut by a crowded window or an eyepiece's rim) is not a cell to find
MIN_IN_SIGHT = 0.35
sys.path.insert(0, str(HERE.parent / "src"))

from bloodcell.data.fields import (
    KINDS,
    Boxes,
    fill_colour,
    load_field,
    open_fields,
    read_boxes,
    read_kinds,
    read_label_fixes,
)
from bloodcell.data.framing import stain_score
from bloodcell.evaluation.boxed_fields import score_fields, type_metrics
from bloodcell.evaluation.detection import detection_metrics
from bloodcell.inference import load_predictor
from bloodcell.inference.count import FieldCounter
from bloodcell.inference.detect import Detections, load_detector


def otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * centres)
    total_w, total_m = weight[-1], mean[-1]
    between = (total_m * weight / total_w - mean) ** 2 / np.maximum(weight * (total_w - weight), 1)
    return float(centres[np.argmax(between)])


def classical_detect(image: np.ndarray) -> Detections:
    """Stain thresholding + distance-transform watershed: the textbook pipeline, at the field's own scale.

    - cells: the foreground (green channel below Otsu's threshold), holes filled; the red-cell
      radius r is the median height of its distance transform's local maxima;
    - white cells: blobs of the purple stain score above median + 0.6 x (99.5th percentile -
      median), larger than a third of a red cell; the box is the nucleus's grown by a third;
    - platelets: smaller purple blobs (down to a fiftieth of a red cell);
    - red cells: the foreground minus white cells, split by a watershed on its distance
      transform from one marker per local maximum at least r apart.
    Scores: nucleus area against a red cell's (white cells), roundness of area (red cells),
    stain strength (platelets).
    """
    height, width = image.shape[:2]
    step = max(1, round(max(height, width) / 400))  # work near 400 px
    small = image[::step, ::step]
    score = ndimage.uniform_filter(stain_score(small), 3)
    median, top = np.percentile(score, [50, 99.5])
    purple = ndimage.binary_opening(score > median + 0.6 * (top - median))
    green = small[..., 1].astype(np.float32)
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(green < otsu(green.ravel()), iterations=2))
    distance = ndimage.distance_transform_edt(fg)
    maxima = (distance == ndimage.maximum_filter(distance, size=5)) & (distance > 2)
    radius = float(np.median(distance[maxima])) if maxima.any() else 10.0
    typical = np.pi * radius**2
    boxes, kinds, scores = [], [], []
    plabels, _ = ndimage.label(purple)
    white_mask = np.zeros_like(fg)
    for index, sl in enumerate(ndimage.find_objects(plabels), 1):
        if sl is None:
            continue
        blob = plabels[sl] == index
        area = blob.sum()
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if area > typical / 3:  # a nucleus
            grow = 0.33 * max(y1 - y0, x1 - x0)
            box = [max(0, x0 - grow), max(0, y0 - grow), min(small.shape[1], x1 + grow), min(small.shape[0], y1 + grow)]
            boxes.append(box)
            kinds.append(0)
            scores.append(min(1.0, area / typical))
            white_mask[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = True
        elif area > typical / 50:
            boxes.append([x0, y0, x1, y1])
            kinds.append(2)
            scores.append(float(np.clip((score[sl][blob].mean() - median) / max(top - median, 1e-6), 0, 1)))
    red = fg & ~white_mask
    distance = ndimage.distance_transform_edt(red)
    peaks = (distance == ndimage.maximum_filter(distance, size=2 * int(radius) + 1)) & (distance > 0.5 * radius)
    markers, _ = ndimage.label(peaks)
    markers = markers.astype(np.int32)
    markers[~red] = -1  # background marker
    relief = (255 - np.clip(distance * 255 / max(distance.max(), 1), 0, 255)).astype(np.uint8)
    regions = ndimage.watershed_ift(relief, markers)
    regions[~red] = 0
    for index, sl in enumerate(ndimage.find_objects(np.clip(regions, 0, None)), 1):
        if sl is None:
            continue
        area = (regions[sl] == index).sum()
        if area < 0.25 * typical:
            continue
        boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
        kinds.append(1)
        scores.append(float(np.exp(-abs(np.log(area / typical)))))
    xyxy = np.asarray(boxes, np.float32).reshape(-1, 4) * step
    return Detections(Boxes(xyxy, np.asarray(kinds, np.int64)), np.asarray(scores, np.float32))


def interior(found: list[Detections], fields, margin: float = 2.0) -> tuple[list[Detections], list[Boxes]]:
    """Detections and true boxes of cells not cut by the field's edge (boxes at least ``margin`` px inside)."""
    kept_found, kept_truth = [], []
    for det, (image, truth) in zip(found, fields):
        height, width = image.shape[:2]

        def inside(xyxy, width=width, height=height):
            return ((xyxy[:, 0] >= margin) & (xyxy[:, 1] >= margin) & (xyxy[:, 2] <= width - margin)
                    & (xyxy[:, 3] <= height - margin))

        d, t = inside(det.boxes.xyxy), inside(truth.xyxy)
        kept_found.append(Detections(det.boxes.select(d), det.scores[d]))
        kept_truth.append(truth.select(t))
    return kept_found, kept_truth


def mosaic(fields: list[tuple[np.ndarray, Boxes]], index: int, n: int) -> tuple[np.ndarray, Boxes, int, int]:
    """n x n consecutive fields side by side, with their boxes (clipped to their own field), and the
    (height, width) each field was cut to."""
    chosen = [fields[(index + k) % len(fields)] for k in range(n * n)]
    height = min(image.shape[0] for image, _ in chosen)
    width = min(image.shape[1] for image, _ in chosen)
    canvas = np.zeros((n * height, n * width, 3), np.uint8)
    xyxy, kinds = [], []
    for k, (image, boxes) in enumerate(chosen):
        top, left = (k // n) * height, (k % n) * width
        canvas[top : top + height, left : left + width] = image[:height, :width]
        xyxy.append(np.clip(boxes.xyxy, 0, [width, height, width, height]) + np.array([left, top, left, top], np.float32))
        kinds.append(boxes.kinds)
    return canvas, Boxes(np.concatenate(xyxy).astype(np.float32), np.concatenate(kinds)), height, width


def zoomed_out(fields: list[tuple[np.ndarray, Boxes]], index: int, n: int = 2) -> tuple[np.ndarray, Boxes]:
    """1/n of the magnification: n x n consecutive fields side by side, with all their boxes, resized
    to one field's size (so the cells are n times smaller in a field of the usual size)."""
    canvas, boxes, height, width = mosaic(fields, index, n)
    xyxy = boxes.xyxy
    keep = (xyxy[:, 2] - xyxy[:, 0] > 2) & (xyxy[:, 3] - xyxy[:, 1] > 2)
    canvas = np.asarray(Image.fromarray(canvas).resize((width, height), Image.Resampling.BILINEAR))
    return canvas, Boxes(xyxy[keep] / n, boxes.kinds[keep])


def crowded(fields: list[tuple[np.ndarray, Boxes]], index: int, magnification: float) -> tuple[np.ndarray, Boxes]:
    """A crowded field at ``magnification`` (0.34-1) of the training fields', as a lower-power objective shows
    a smear: a 4:3 window of 3 x 3 consecutive fields side by side, resized to 640x480. Boxes less than
    35% inside the window are left out, as train-detector leaves them out of its crops."""
    n = 3
    canvas, boxes, height, width = mosaic(fields, index, n)
    xyxy, kinds = boxes.xyxy, boxes.kinds
    window_w = width / magnification
    window_h = 0.75 * window_w
    x0, y0 = (n * width - window_w) / 2, (n * height - window_h) / 2
    out = Image.fromarray(canvas).crop((round(x0), round(y0), round(x0 + window_w), round(y0 + window_h)))
    shifted = xyxy - np.array([x0, y0, x0, y0], np.float32)
    area = np.maximum((shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1]), 1)
    inside = np.clip(shifted, 0, [window_w, window_h, window_w, window_h])
    visible = np.clip(inside[:, 2] - inside[:, 0], 0, None) * np.clip(inside[:, 3] - inside[:, 1], 0, None) / area
    keep = visible >= MIN_IN_SIGHT
    scale = np.array([640 / window_w, 480 / window_h] * 2, np.float32)
    return (np.asarray(out.resize((640, 480), Image.Resampling.BILINEAR)),
            Boxes((inside[keep] * scale).astype(np.float32), kinds[keep]))


def cut_marked(fields: list[tuple[np.ndarray, Boxes]], margin: float = 2.0) -> list[tuple[np.ndarray, Boxes]]:
    """Each field with its boxes cut by the field's own edge marked (their kind + len(KINDS)), to follow
    them into a mosaic, where they lie on the seams inside it (:func:`whole_cells_only`)."""
    marked = []
    for image, boxes in fields:
        height, width = image.shape[:2]
        x = boxes.xyxy
        cut = (x[:, 0] <= margin) | (x[:, 1] <= margin) | (x[:, 2] >= width - margin) | (x[:, 3] >= height - margin)
        marked.append((image, Boxes(x, np.where(cut, boxes.kinds + len(KINDS), boxes.kinds))))
    return marked


def whole_cells_only(boxes: Boxes) -> Boxes:
    """The marked boxes (cut by their own field's edge) as VOC's "difficult" ones: a detection on one counts
    neither way, and they are not to be found. A mosaic of fields puts their edge slivers inside it,
    where no lab's field has them."""
    cut = boxes.kinds >= len(KINDS)
    return Boxes(boxes.xyxy[~cut], boxes.kinds[~cut], ignored=boxes.xyxy[cut])


def variant(image: np.ndarray, boxes: Boxes, name: str) -> tuple[np.ndarray, Boxes]:
    """The field as another lab might photograph it: other sizes, aspect ratio, stain, focus."""
    height, width = image.shape[:2]
    if name in ("300px", "1600px", "640x480"):
        new_w, new_h = {"300px": (300, 300 * height // width), "1600px": (1600, 1600 * height // width),
                        "640x480": (640, 480)}[name]
        out = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
        return out, Boxes(boxes.xyxy * np.array([new_w / width, new_h / height] * 2, np.float32), boxes.kinds)
    x = image.astype(np.float32)
    if name == "purple_stain":  # more blue, less green: a Giemsa-like cast
        x = x * np.array([0.95, 0.85, 1.08])
    elif name == "yellow_lamp":
        x = x * np.array([1.05, 1.0, 0.8])
    elif name == "blurred":
        x = ndimage.gaussian_filter(x, sigma=(2, 2, 0))
    return np.clip(x, 0, 255).astype(np.uint8), boxes


def eyepiece(image: np.ndarray, boxes: Boxes, seed: int = 0) -> tuple[np.ndarray, Boxes]:
    """The field as a phone photographs it through the eyepiece: twice the pixels, seen through a round
    aperture 0.92 of its side across, in a dark 4:3 frame (noisy black, a soft rim). The truth is what the
    aperture shows, boxed as a field's edge cuts its cells: each box clipped to the bounding box of its pixels
    inside the rim. A box less than 35% in sight is VOC's "difficult" (ignored, clipped the same way): a
    detection on it counts neither way."""
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    big = np.asarray(Image.fromarray(image).resize((2 * width, 2 * height), Image.Resampling.BICUBIC)).astype(np.float32)
    radius = 0.46 * min(big.shape[:2])
    frame_h = int(2 * radius / 0.9)
    frame_w = frame_h * 4 // 3
    canvas = np.zeros((frame_h, frame_w, 3), np.float32)
    top, left = (frame_h - big.shape[0]) // 2, (frame_w - big.shape[1]) // 2
    sy0, sx0 = max(0, -top), max(0, -left)
    dy0, dx0 = max(0, top), max(0, left)
    h = min(big.shape[0] - sy0, frame_h - dy0)
    w = min(big.shape[1] - sx0, frame_w - dx0)
    canvas[dy0 : dy0 + h, dx0 : dx0 + w] = big[sy0 : sy0 + h, sx0 : sx0 + w]
    yy, xx = np.mgrid[:frame_h, :frame_w]
    distance = np.hypot(yy - frame_h / 2, xx - frame_w / 2)
    light = np.clip((radius - distance) / (0.03 * radius), 0, 1)[..., None]  # the aperture's soft rim
    dark = rng.normal(10, 3, canvas.shape)
    out = np.clip(canvas * light + dark * (1 - light), 0, 255).astype(np.uint8)
    in_sight = distance < radius
    xyxy = boxes.xyxy * 2 + np.array([left, top, left, top], np.float32)
    kept, kinds, hidden = [], [], []
    for box, kind in zip(xyxy, boxes.kinds):
        x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
        x1, y1 = min(int(np.ceil(box[2])), frame_w), min(int(np.ceil(box[3])), frame_h)
        seen = in_sight[y0:y1, x0:x1]
        if not seen.any():
            continue  # out of sight
        ys, xs = np.nonzero(seen)
        clipped = [max(box[0], x0 + xs.min()), max(box[1], y0 + ys.min()),
                   min(box[2], x0 + xs.max() + 1), min(box[3], y0 + ys.max() + 1)]
        if seen.mean() < MIN_IN_SIGHT:
            hidden.append(clipped)
        else:
            kept.append(clipped)
            kinds.append(kind)
    return out, Boxes(np.asarray(kept, np.float32).reshape(-1, 4), np.asarray(kinds, boxes.kinds.dtype),
                      ignored=np.asarray(hidden, np.float32).reshape(-1, 4))


def sparse_third(image: np.ndarray, boxes: Boxes) -> tuple[np.ndarray, Boxes]:
    """A third of the magnification in a sparse field: the field shrunk to a third in the corner of a
    canvas of its own size and median colour (one small patch of cells, as in a thin area of a smear)."""
    height, width = image.shape[:2]
    small = np.asarray(Image.fromarray(image).resize((width // 3, height // 3), Image.Resampling.BILINEAR))
    canvas = np.empty_like(image)
    canvas[:] = fill_colour(image)
    canvas[: small.shape[0], : small.shape[1]] = small
    scale = np.array([small.shape[1] / width, small.shape[0] / height] * 2, np.float32)
    return canvas, Boxes(boxes.xyxy * scale, boxes.kinds)


VARIANTS = ("300px", "1600px", "640x480", "zoomed_out", "zoomed_out_3", "zoomed_out_4", "sparse_third", "crowded_0.6",
            "purple_stain", "yellow_lamp", "blurred", "eyepiece")
# read again without the detector's red-cell ruler (red_cell_side None): what the ruler changes
WITHOUT_RULER = ("zoomed_out_3", "zoomed_out_4", "sparse_third", "crowded_0.6")
CROWDED = 0.6  # the magnification of the crowded variant and of the second speed figure


def speed(detector_name: str, model: str, fields: list[np.ndarray], count: int) -> dict:
    """fields/s of `count` over ``count`` JPEGs made from ``fields`` (cycled), resized to 640x480."""
    from bloodcell.workflows import count_fields

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "fields"
        folder.mkdir()
        for i in range(count):
            Image.fromarray(fields[i % len(fields)]).resize((640, 480), Image.Resampling.BILINEAR).save(
                folder / f"f{i:04d}.jpg", quality=90)
        count_fields([folder], Path(tmp) / "warm", model, detector_name, overlays=False, report=False)  # load and warm up
        started = time.perf_counter()
        summary = count_fields([folder], Path(tmp) / "out", model, detector_name, overlays=False, report=False)
        seconds = time.perf_counter() - started
    return {"fields": count, "size": "640x480", "seconds": seconds, "fields_per_s": count / seconds,
            "white_cells": summary["differential"]["white_cell_boxes"]}


def pbc_framing(detector_name: str, model: str, curated: Path, limit: int) -> dict:
    """Context ratio on PBC train images; accuracy through count vs predict on PBC test images."""
    from bloodcell.data import decode_file
    from bloodcell.inference.count import CROP_CONTEXT

    detector = load_detector(detector_name)
    predictor = load_predictor(model)
    rng = np.random.default_rng(0)
    ratios = []
    train = [p for p in sorted((curated / "images" / "train").rglob("*.jpg")) if p.parent.name != "platelet"]
    for path in [train[i] for i in rng.permutation(len(train))[:limit]]:
        image = decode_file(path)[0]
        det = detector.detect(image)
        white = det.boxes.kinds == KINDS.index("white_cell")
        if white.any():
            box = det.boxes.xyxy[white][np.argmax(det.scores[white])]
            ratios.append(min(image.shape[:2]) / max(box[2] - box[0], box[3] - box[1]))
    counter = FieldCounter(detector, predictor)
    # The same network without the nucleus rule: how many white-cell boxes the rule drops on another lab's smears.
    unruled = detector.with_contract(detector.contract.model_copy(update={"white_cell_min_stain": 0.0}))
    test = [p for p in sorted((curated / "images" / "test").rglob("*.jpg")) if p.parent.name != "platelet"]
    test = [test[i] for i in rng.permutation(len(test))[:limit]]
    hits_count = hits_predict = found = 0
    off_centre = {"rule": 0, "no_rule": 0}  # white-cell boxes away from the image's central cell

    def off(found_cells: Detections, image: np.ndarray) -> int:
        h, w = image.shape[:2]
        white = found_cells.boxes.xyxy[found_cells.boxes.kinds == KINDS.index("white_cell")]
        cx, cy = (white[:, 0] + white[:, 2]) / 2, (white[:, 1] + white[:, 3]) / 2
        return int((~((abs(cx - w / 2) < w / 4) & (abs(cy - h / 2) < h / 4))).sum())

    for start in range(0, len(test), 16):
        chunk = test[start : start + 16]
        images = [decode_file(p)[0] for p in chunk]
        labels = [p.parent.name for p in chunk]
        direct = predictor.probabilities(images).argmax(1)
        detected = detector.detect_batch(images)
        results = counter.type_cells(images, [str(p) for p in chunk], detected)
        off_centre["rule"] += sum(off(d, image) for d, image in zip(detected, images))
        off_centre["no_rule"] += sum(off(d, image) for d, image in zip(unruled.detect_batch(images), images))
        for label, d, result in zip(labels, direct, results):
            hits_predict += predictor.class_names[d] == label
            white = [c for c in result.cells if c["kind"] == "white_cell"]
            if white:
                found += 1
                best = max(white, key=lambda c: c["score"])
                hits_count += best["class"] == label
    # Platelets: PBC test-split platelet crops (none of them pasted in training: those come from the
    # platelet folder's first 400 of a seeded draw, and are excluded), the platelet at the centre.
    platelet_dir = Path(os.environ.get("BLOODCELL_DATA", "")) / "pbc224" / "platelet"
    pasted = set()
    if platelet_dir.is_dir():
        paths = sorted(p for p in platelet_dir.iterdir() if p.is_file())
        pasted = {paths[i].name for i in np.random.default_rng(0).permutation(len(paths))[:400]}
    platelets = [p for p in sorted((curated / "images" / "test" / "platelet").glob("*.jpg")) if p.name not in pasted]
    centred = {"platelet": 0, "white_cell": 0}
    for path in platelets:
        image = decode_file(path)[0]
        det = detector.detect(image)
        h, w = image.shape[:2]
        for kind in centred:
            mine = det.boxes.xyxy[det.boxes.kinds == KINDS.index(kind)]
            cx, cy = (mine[:, 0] + mine[:, 2]) / 2, (mine[:, 1] + mine[:, 3]) / 2
            centred[kind] += bool(np.any((abs(cx - w / 2) < w / 4) & (abs(cy - h / 2) < h / 4)))
    return {"context_median": float(np.median(ratios)) if ratios else None, "context_used": CROP_CONTEXT,
            "context_images": len(ratios), "test_images": len(test), "white_cell_found": found / len(test),
            "accuracy_predict": hits_predict / len(test), "accuracy_count": hits_count / len(test),
            "white_cells_off_centre": off_centre["rule"], "white_cells_off_centre_no_nucleus_rule": off_centre["no_rule"],
            "platelet_images": len(platelets), "platelet_found_at_centre": centred["platelet"] / max(len(platelets), 1),
            "platelet_centre_called_white_cell": centred["white_cell"] / max(len(platelets), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="default")
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--pbc-test", type=Path, default=None)
    parser.add_argument("--pbc-images", type=int, default=400)
    parser.add_argument("--speed-fields", type=int, default=100)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fields.json")
    parser.add_argument("--labels-as-given", action="store_true",
                        help=f"score against the set's labels as they are, without {LABEL_FIXES.name}'s fixed kinds")
    args = parser.parse_args()
    root = args.data or Path(os.environ.get("BLOODCELL_DATA", HERE.parent.parent / "shared" / "data")) / "fields"
    kinds = read_kinds(root)
    items = open_fields(root, args.split)
    fields = [load_field(item, kinds) for item in items]
    as_labelled = [boxes for _, boxes in fields]
    fixed = 0
    if not args.labels_as_given:  # the same fields, their label files read through the fixes of LABEL_FIXES
        fixed_items = open_fields(root, args.split, read_label_fixes(LABEL_FIXES, root, only_present=True))
        fields = [(image, read_boxes(item, image.shape[1], image.shape[0], kinds))
                  for (image, _), item in zip(fields, fixed_items)]
        fixed = sum(len(item.fixes) for item in fixed_items)
    truth = [boxes for _, boxes in fields]

    detector = load_detector(args.detector)
    low = detector.contract.lowered()
    operating = detector.contract.operating()
    saved = detector.contract
    # count's path, every detection kept down to 0.05 for AP; the white cells typed (scored where the set types them)
    counter = FieldCounter(detector, load_predictor(args.model))
    typed, _, learned_found, _ = score_fields(counter, [(str(item.image), lambda f=f: f) for item, f in zip(items, fields)])
    learned = detection_metrics(learned_found, truth, operating=operating)
    learned_as_labelled = detection_metrics(learned_found, as_labelled, operating=operating)
    learned_interior = detection_metrics(*interior(learned_found, fields), operating=operating)
    types = type_metrics(typed, truth, counter.class_names)
    started = time.perf_counter()
    classical_found = [classical_detect(image) for image, _ in fields]
    classical_s = (time.perf_counter() - started) / len(fields)
    classical = detection_metrics(classical_found, truth)
    variants = {}
    for name in VARIANTS:
        if name.startswith("zoomed_out"):
            n = int(name.rpartition("_")[2]) if name[-1].isdigit() else 2
            changed = [zoomed_out(fields, i, n) for i in range(len(fields))]
        elif name == "sparse_third":
            changed = [sparse_third(image, boxes) for image, boxes in fields]
        elif name == "eyepiece":
            changed = [eyepiece(image, boxes, i) for i, (image, boxes) in enumerate(fields)]
        elif name.startswith("crowded"):
            marked = [crowded(cut_marked(fields), i, CROWDED) for i in range(len(fields))]
            changed = [(image, Boxes(b.xyxy, b.kinds % len(KINDS))) for image, b in marked]
        else:
            changed = [variant(image, boxes, name) for image, boxes in fields]
        readings = [(name, low)]
        if name in WITHOUT_RULER and low.red_cell_side is not None:
            readings.append((f"{name}_no_ruler", low.model_copy(update={"red_cell_side": None})))
        for label, contract in readings:
            detector.contract = contract
            found = [detector.detect(image) for image, _ in changed]
            detector.contract = saved
            metrics = detection_metrics(found, [b for _, b in changed], operating=operating)
            variants[label] = {k: metrics[k]["ap50"] for k in KINDS} | {"white_cell_recall": metrics["white_cell"]["recall"]}
            if name.startswith("crowded") and label == name:
                # the same readings scored on whole cells: the source fields' edge slivers now on the seams ignored
                whole = detection_metrics(found, [whole_cells_only(b) for _, b in marked], operating=operating)
                variants[f"{name}_whole_cells"] = ({k: whole[k]["ap50"] for k in KINDS}
                                                   | {"white_cell_recall": whole["white_cell"]["recall"]})

    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "data": str(root), "split": args.split, "fields": len(fields), "detector": args.detector,
              "label_fixes": fixed, "learned": learned, "learned_as_labelled": learned_as_labelled,
              "learned_interior": learned_interior, "classical": classical, "classical_s_per_field": classical_s,
              "variants": variants}
    if types is not None:
        result["types"] = types
    try:
        with open("/proc/cpuinfo") as handle:
            result["machine"]["cpu"] = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if args.speed_fields:
        result["speed"] = speed(args.detector, args.model, [image for image, _ in fields], args.speed_fields)
        result["speed_crowded"] = speed(args.detector, args.model, [crowded(fields, i, CROWDED)[0] for i in range(len(fields))],
                                        args.speed_fields) | {"magnification": CROWDED}
    if args.pbc_test:
        result["pbc_framing"] = pbc_framing(args.detector, args.model, args.pbc_test, args.pbc_images)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{len(fields)} {args.split} fields of {root}")
    print(f"{'kind':<12}{'boxes':>7}{'AP50':>8}{'recall':>8}{'prec.':>8}{'found':>8}   {'classical AP50':>14}{'recall':>8}")
    for name in KINDS:
        a, b = learned[name], classical[name]
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"
        print(f"{name:<12}{a['boxes']:>7}{fmt(a['ap50']):>8}{fmt(a['recall']):>8}{fmt(a['precision']):>8}"
              f"{fmt(a['recall_iou30']):>8}   {fmt(b['ap50']):>14}{fmt(b['recall']):>8}")
    print("found: recall with a detection matched at IoU 0.3, whatever the box convention (nucleus or whole cell)")
    if fixed:
        print(f"{fixed} boxes scored with the kinds of {LABEL_FIXES.name} (labelled as the wrong kind); as labelled: "
              + ", ".join(f"{k} AP50 {learned_as_labelled[k]['ap50']:.3f} recall {learned_as_labelled[k]['recall']:.3f}"
                          for k in KINDS if learned_as_labelled[k]["ap50"] is not None))
    w = learned_interior["white_cell"]
    print(f"white cells not cut by the field's edge: {w['boxes']} boxes, AP50 {w['ap50']:.3f}, recall {w['recall']:.3f}, "
          f"precision {w['precision']:.3f}")
    if types is not None:
        print(f"white-cell types ({args.model}): {types['typed_cells']} typed cells, {types['found']} found; accuracy "
              f"{types['accuracy']:.3f} (misses count as wrong), balanced {types['balanced_accuracy']:.3f}; differential off "
              f"by up to {100 * types['differential_max_error']:.1f} points")
    print("AP50 when the fields are changed as another lab's might be:")
    for name, v in variants.items():
        print(f"  {name:<27}" + "".join(f"{k} {v[k]:.3f}  " if v[k] is not None else f"{k} -  " for k in KINDS)
              + f"white-cell recall {v['white_cell_recall']:.3f}")
    if "speed" in result:
        s = result["speed"]
        print(f"count: {s['fields_per_s']:.1f} fields/s at {s['size']} ({s['fields']} fields, {s['white_cells']} white cells)")
        s = result["speed_crowded"]
        print(f"count: {s['fields_per_s']:.1f} fields/s at {s['size']}, crowded fields at {s['magnification']} of the magnification "
              f"({s['fields']} fields, {s['white_cells']} white cells)")
    if "pbc_framing" in result:
        p = result["pbc_framing"]
        print(f"PBC framing: context median {p['context_median']:.2f} (used {p['context_used']}); "
              f"accuracy through count {p['accuracy_count']:.4f} vs predict {p['accuracy_predict']:.4f} "
              f"({p['test_images']} test images, white cell found in {p['white_cell_found']:.3f}); "
              f"platelet found at the centre of {p['platelet_found_at_centre']:.3f} of {p['platelet_images']} PBC platelet crops "
              f"(a white cell there in {p['platelet_centre_called_white_cell']:.3f})")
        print(f"PBC test images: {p['white_cells_off_centre']} white-cell boxes away from the central cell "
              f"({p['white_cells_off_centre_no_nucleus_rule']} without the nucleus rule)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
