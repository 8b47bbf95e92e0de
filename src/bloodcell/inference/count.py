"""Counting whole fields: find every cell, classify each white cell on a crop framed as in training.

The classifier was trained on analyser crops where the white cell sits at the centre with a
ring of red cells around it. A white cell found in a field is cut out the same way: a square
``context`` times the box's longer side, centred on the box (padded with the field's median
colour at the field's edge), then passed through the classifier's own preprocessing (its
framing and resize, :func:`bloodcell.data.preprocess`). ``context`` is measured: the median
ratio of a PBC training image's side to the white-cell box the detector finds in it
(``benchmarks/fields.py`` prints it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.classes import WHITE_CELLS
from ..data.fields import KINDS, field_of_view, fill_colour
from .batch import differential_count, prediction_row, to_check
from .detect import CellDetector, Detections
from .predictor import Predictor

# PBC image side / detected white-cell box side: median 2.33 over 400 PBC training images
# (benchmarks/fields.py, the shipped detector).
CROP_CONTEXT = 2.3
KIND_COLOURS = {"white_cell": (123, 44, 191), "red_cell": (214, 40, 40), "platelet": (0, 150, 80)}
# A white-cell box holds a nucleus (the detector's nucleus rule); the classifier answering this is sent to check.
NOT_A_WHITE_CELL = "platelet"


# A white cell cut by the field's edge is shown only in part: its box, short across the edge it touches, is
# under this share of its other side. Typing PBC's white cells cut to 55% of their width: 0.944 right
# where counted, against 0.987 whole (docs/experiments.md, twenty-fourth session).
EDGE_CUT_ASPECT = 0.75
EDGE_MARGIN = 2.0  # pixels: a box this close to the field's border touches it


def cut_by_edge(box, width: int, height: int, aspect: float = EDGE_CUT_ASPECT) -> bool:
    """Whether a white cell's box (x0, y0, x1, y1) touches the field's border and is short across it, as a
    cell partly outside the photograph is; a whole cell is about as wide as high."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    across_x = (x0 <= EDGE_MARGIN or x1 >= width - EDGE_MARGIN) and w < aspect * h
    across_y = (y0 <= EDGE_MARGIN or y1 >= height - EDGE_MARGIN) and h < aspect * w
    return bool(across_x or across_y)


def white_cell_to_check(row: dict) -> bool:
    """A found white cell a person should look at: unsure, unlike the training lab's cells, or called a
    platelet (the detector found a nucleus in it, so detector and classifier disagree)."""
    return to_check(row) or row["pred"] == NOT_A_WHITE_CELL


@dataclass
class FieldResult:
    """One field's cells (rows of cells.csv, without the image column) and counts."""

    name: str
    width: int
    height: int
    cells: list[dict] = field(default_factory=list)
    magnification: float = 1.0  # > 1: taken at a lower magnification than the detector's training, read on tiles
    crops: list[np.ndarray] = field(default_factory=list)  # the white cells as the classifier saw them, in row order
    slide: str = ""  # the slide it belongs to (:func:`slide_of`), set by whoever knows where it came from

    @property
    def white_cells(self) -> list[dict]:
        """The white cells' rows, in order (``crops``, when kept, is in the same order)."""
        return [c for c in self.cells if c["kind"] == "white_cell"]

    def counts(self, class_names: list[str]) -> dict:
        white = self.white_cells
        by_class = Counter(c["class"] for c in white if not c["to_check"])
        row = {"image": self.name, "white_cells": len(white)}
        row.update({name: by_class.get(name, 0) for name in class_names})
        row["red_cells"] = sum(1 for c in self.cells if c["kind"] == "red_cell")
        row["platelets"] = sum(1 for c in self.cells if c["kind"] == "platelet")
        row["to_check"] = sum(1 for c in white if c["to_check"])
        return row


def square_crop(image: np.ndarray, box: np.ndarray, context: float) -> np.ndarray:
    """A square of ``context`` x the box's longer side around the box's centre; outside the field, its median colour."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(2, round(max(x1 - x0, y1 - y0) * context))
    left, top = round((x0 + x1) / 2 - side / 2), round((y0 + y1) / 2 - side / 2)
    crop = np.empty((side, side, 3), np.uint8)
    crop[:] = fill_colour(image)
    sx0, sy0 = max(left, 0), max(top, 0)
    sx1, sy1 = min(left + side, width), min(top + side, height)
    if sx1 > sx0 and sy1 > sy0:
        crop[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[sy0:sy1, sx0:sx1]
    return crop


def boxed_white_cells(root, typed_only: bool = False, on_skip=None, skip_unknown: bool = False):
    """The white cells boxed in a field set (any layout :mod:`bloodcell.data.fields` reads), each cut out
    as ``count`` cuts a white cell it found: (crop, type ("" where the box has none), "field#box").

    ``typed_only``: only the boxes whose class is a white-cell type. An unreadable field is passed to
    ``on_skip(path, reason)`` and left out. ``skip_unknown``: boxes of classes that are neither a kind
    nor a white-cell type are left out instead of refused.
    """
    from ..core.errors import ImageReadError
    from ..data.fields import load_field, open_fields, read_kinds

    names = read_kinds(root, skip_unknown)
    for item in open_fields(root, None):
        try:
            image, boxes = load_field(item, names, skip_unknown)
        except ImageReadError as exc:
            if on_skip:
                on_skip(item.image, str(exc))
            continue
        image = fields_of_view([image])[1][0]
        for index in np.flatnonzero(boxes.kinds == KINDS.index("white_cell")):
            kind = "" if boxes.types is None else str(boxes.types[index])
            if kind or not typed_only:
                yield square_crop(image, boxes.xyxy[index], CROP_CONTEXT), kind, f"{item.image}#{index}"


# An image is read as a whole field, not a single-cell crop, when the detector's best white cell is
# smaller than this share of the image's shorter side (in PBC's crops 0.27-0.5), or lies off its centre.
FIELD_CELL_SHARE = 0.2
FIELD_OFF_CENTRE = 0.2  # of the image's side, between the white cell's centre and the image's


def best_white_cell(found: Detections) -> tuple[np.ndarray, float] | None:
    """The most confident white cell's box (field pixels) and score, or None where none was found."""
    white = np.flatnonzero(found.boxes.kinds == KINDS.index("white_cell"))
    if not len(white):
        return None
    best = white[np.argmax(found.scores[white])]
    return found.boxes.xyxy[best], float(found.scores[best])


def cut_best_white_cells(images: list[np.ndarray], finder: CellDetector) -> list[tuple[np.ndarray, np.ndarray | None,
                                                                                      float | None]]:
    """Whole fields holding one white cell each: each field's most confident white cell cut out as ``count``
    cuts it, with its box (field pixels) and the detector's score; the field itself, with None and None,
    where none was found. What ``evaluate`` scores and ``adapt`` learns from on such fields."""
    views, painted = fields_of_view(images)
    cut = []
    for field_image, found in zip(painted, finder.detect_batch(images, views)):
        cell = best_white_cell(found)
        if cell is None:
            cut.append((field_image, None, None))
        else:
            cut.append((square_crop(field_image, cell[0], CROP_CONTEXT), cell[0], cell[1]))
    return cut


def source_white_cells(source, finder: CellDetector, chunk: int = 16) -> Iterator[tuple[object, tuple | Exception]]:
    """Each item of a source of whole fields (one white cell each), with what :func:`cut_best_white_cells`
    gives for it (crop, box, score), or the error that kept it from being read. Decoded a chunk at a time,
    detected in batches; what ``evaluate`` scores and ``adapt --data`` learns from on such fields."""
    from ..data.sources import load_item

    for start in range(0, len(source.items), chunk):
        items, decoded = [], []
        for item in source.items[start : start + chunk]:
            try:
                decoded.append(load_item(source, item)[0])
                items.append(item)
            except Exception as exc:  # noqa: BLE001 - handed back with its item, for the caller to name
                yield item, exc
        if decoded:
            yield from zip(items, cut_best_white_cells(decoded, finder))


def looks_like_field(image: np.ndarray, found: Detections) -> bool:
    """Whether ``found`` (the detector's cells of ``image``) say it is a whole field rather than a crop
    framed round one white cell: its white cell small for the frame or away from its centre, with red
    cells around. An image without a white cell says nothing (a platelet's crop, or a field without one)."""
    cell = best_white_cell(found)
    if cell is None:
        return False
    best = cell[0]
    red = int((found.boxes.kinds == KINDS.index("red_cell")).sum())
    height, width = image.shape[:2]
    side = max(best[2] - best[0], best[3] - best[1])
    off = max(abs((best[0] + best[2]) / 2 - width / 2) / width, abs((best[1] + best[3]) / 2 - height / 2) / height)
    return red >= 3 and (side < FIELD_CELL_SHARE * min(height, width) or off > FIELD_OFF_CENTRE)


def count_field_like(paths: list[str], detector="default", sample: int = 16) -> tuple[int, int] | None:
    """(whole fields, images looked at) among up to ``sample`` of ``paths`` taken evenly, or None where
    no detector is installed. ``evaluate`` and ``predict`` say so when most are fields: a classifier
    of single-cell crops frames a whole field as one cell, and ``count`` / ``evaluate --fields`` read it."""
    from ..core.errors import BloodcellError
    from ..data.sources import decode_file
    from .detect import load_detector

    if not paths:
        return None
    chosen = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(sample, len(paths))).round().astype(int))]
    images = []
    for path in chosen:
        try:
            images.append(decode_file(path)[0])
        except Exception:  # noqa: BLE001, S112 - an unreadable file (or an .npz entry) is the caller's to report
            continue
    if not images:
        return None  # the detector is loaded only when there is an image file to look at
    try:
        finder = load_detector(detector)
    except BloodcellError:
        return None
    found = finder.detect_batch(images)
    return sum(bool(looks_like_field(image, f)) for image, f in zip(images, found)), len(images)


def mostly_fields(counted: tuple[int, int] | None) -> bool:
    """Whether :func:`count_field_like`'s sample says the images are whole fields (half or more of at least 4)."""
    return counted is not None and counted[1] >= 4 and 2 * counted[0] >= counted[1]


def fields_of_view(images: list[np.ndarray]) -> tuple[list, list[np.ndarray]]:
    """Each image's :func:`~bloodcell.data.fields.field_of_view` (for the detector), and the image with any
    dark surround painted over, to cut white cells from: a cell at an eyepiece's rim is then framed in
    the smear's colour, as the detector saw it, not in black."""
    views = [field_of_view(image) for image in images]
    return views, [image if view is None else view[0] for image, view in zip(images, views)]


class FieldCounter:
    """Detector + classifier: every cell of a field, white cells typed, as rows and counts."""

    def __init__(self, detector: CellDetector, predictor: Predictor, abstain_below: float = 0.7,
                 context: float = CROP_CONTEXT):
        self.detector = detector
        self.predictor = predictor
        self.abstain_below = abstain_below
        self.context = context

    @property
    def class_names(self) -> list[str]:
        return self.predictor.class_names

    def count(self, images: list[np.ndarray], names: list[str], keep_crops: bool = False) -> list[FieldResult]:
        views, painted = fields_of_view(images)
        return self.type_cells(painted, names, self.detector.detect_batch(images, views), keep_crops)

    def type_cells(self, images: list[np.ndarray], names: list[str], found: list[Detections],
                   keep_crops: bool = False) -> list[FieldResult]:
        """Fields' detections as cells, each white cell cut out and classified (``keep_crops``: kept in the result)."""
        crops, owners = [], []
        results = []
        for index, (image, name, det) in enumerate(zip(images, names, found)):
            result = FieldResult(name, int(image.shape[1]), int(image.shape[0]), magnification=det.magnification)
            for box, kind, score in zip(det.boxes.xyxy, det.boxes.kinds, det.scores):
                cell = {"kind": KINDS[kind], "x0": round(float(box[0]), 1), "y0": round(float(box[1]), 1),
                        "x1": round(float(box[2]), 1), "y1": round(float(box[3]), 1), "score": round(float(score), 4),
                        "class": "", "confidence": "", "ood_score": "", "to_check": False, "cut_by_edge": False}
                if KINDS[kind] == "white_cell":
                    cell["cut_by_edge"] = cut_by_edge(box, image.shape[1], image.shape[0])
                    crops.append(square_crop(image, box, self.context))
                    owners.append(cell)
                    if keep_crops:
                        result.crops.append(crops[-1])
                result.cells.append(cell)
            results.append(result)
        if crops:
            probs, ood = self.predictor.scores(crops)
            for i, cell in enumerate(owners):
                row = prediction_row("", probs[i], self.class_names, self.abstain_below,
                                     None if ood is None else float(ood[i]))
                cell["class"], cell["confidence"] = row["pred"], row["confidence"]
                cell["ood_score"] = row.get("ood_score", "")
                # only part of the cell is in the photograph: typed, but left to a person, not counted
                cell["to_check"] = white_cell_to_check(row) or cell["cut_by_edge"]
        return results


def run_differential(results: list[FieldResult]) -> dict:
    """The whole run's differential over its white cells (cells to check left out), plus red cells and platelets."""
    rows = [{"pred": c["class"], "abstained": c["to_check"], "out_of_distribution": False}
            for r in results for c in r.cells if c["kind"] == "white_cell"]
    counts = differential_count(rows)
    counts.pop("abstained", None)
    counts.pop("out_of_distribution", None)
    counts.pop("platelets", None)  # white-cell boxes the classifier calls platelets are in counts; the detector's are below
    counts["fields"] = len(results)
    counts["fields_without_white_cells"] = sum(1 for r in results if not any(c["kind"] == "white_cell" for c in r.cells))
    counts["white_cell_boxes"] = len(rows)
    counts["red_cells"] = sum(1 for r in results for c in r.cells if c["kind"] == "red_cell")
    counts["platelets"] = sum(1 for r in results for c in r.cells if c["kind"] == "platelet")
    counts["white_cell_types"] = list(WHITE_CELLS)
    # Fields taken at a lower magnification than the detector's training fields, read on magnified tiles.
    counts["fields_magnified"] = sum(1 for r in results if r.magnification > 1)
    return counts


def mostly_to_check(differential: dict) -> bool:
    """Whether more than half the white cells found are to check: the fields do not look like the
    training lab's (a differential from :func:`run_differential`)."""
    return bool(differential["white_cell_boxes"]) and differential["to_check"] > differential["white_cell_boxes"] / 2


def slide_of(root: str | Path, name: str) -> str:
    """The slide of field ``name``, found under ``root`` (a folder or a file as the user gave it).

    A lab keeps one folder per slide: the slide is the field's folder relative to ``root``, or
    ``root``'s own name for the fields directly in it; for a file given by itself, its folder's name.
    """
    root, folder = Path(root), Path(name).parent
    if root.is_dir() and folder.is_relative_to(root) and folder != root:
        return folder.relative_to(root).as_posix()
    return folder.name or folder.resolve().name or folder.as_posix()


def slide_differentials(results: list[FieldResult]) -> list[dict]:
    """:func:`run_differential` for each slide's fields (``FieldResult.slide``), in the order slides first appear."""
    slides: dict[str, list[FieldResult]] = {}
    for result in results:
        slides.setdefault(result.slide, []).append(result)
    return [{"slide": slide, **run_differential(fields)} for slide, fields in slides.items()]


def draw_overlay(image: np.ndarray, result: FieldResult) -> Image.Image:
    """The field with each box drawn in its kind's colour and each white cell labelled with its class."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(image.shape[:2]) / 300))
    font = ImageFont.load_default(size=max(12, round(max(image.shape[:2]) / 45)))
    for cell in sorted(result.cells, key=lambda c: c["kind"] == "white_cell"):  # white cells on top
        colour = KIND_COLOURS[cell["kind"]]
        box = [cell["x0"], cell["y0"], cell["x1"], cell["y1"]]
        draw.rectangle(box, outline=colour, width=width)
        if cell["kind"] == "white_cell":
            label = f"{cell['class']} {float(cell['confidence']):.2f}" + (" ?" if cell["to_check"] else "")
            text_box = draw.textbbox((box[0], box[1]), label, font=font)
            top = max(0, box[1] - (text_box[3] - text_box[1]) - 4)
            draw.rectangle([box[0], top, box[0] + text_box[2] - text_box[0] + 4, top + text_box[3] - text_box[1] + 4], fill=colour)
            draw.text((box[0] + 2, top + 1), label, fill=(255, 255, 255), font=font)
    return canvas
