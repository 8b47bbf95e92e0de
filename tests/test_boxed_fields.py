"""A lab's boxed fields: the layouts and class names field sets come in, and scoring the detector and the
white-cell types on them (`bloodcell evaluate` on a field set)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bloodcell.core.errors import BloodcellError
from bloodcell.data.fields import (
    KINDS,
    Boxes,
    FieldLabel,
    field_label,
    is_field_set,
    load_field,
    open_fields,
    read_kinds,
)
from bloodcell.evaluation.boxed_fields import match_white_cells, type_metrics
from bloodcell.inference.count import FieldResult

from .conftest import PBC224, require, whole_fields

WHITE, RED = KINDS.index("white_cell"), KINDS.index("red_cell")


def write_field(images, labels, name, lines, size=(80, 60)):
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (230, 200, 210)).save(images / f"{name}.jpg")
    (labels / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))


def test_class_names_are_read_as_kinds_or_white_cell_types():
    assert field_label("WBC") == FieldLabel("white_cell")
    assert field_label("white blood cells") == FieldLabel("white_cell")
    assert field_label("RBCs") == FieldLabel("red_cell")
    assert field_label("erythrocyte") == FieldLabel("red_cell")
    assert field_label("Platelets") == FieldLabel("platelet")
    assert field_label("Neutrophils") == FieldLabel("white_cell", "neutrophil")
    assert field_label("NRBC") == FieldLabel("white_cell", "erythroblast")  # nucleated: found as a white cell
    assert field_label("blast") is None


def test_roboflow_layout_with_data_yaml_names(tmp_path):
    (tmp_path / "data.yaml").write_text("nc: 3\nnames: ['Platelets', 'RBC', 'WBC']\n")
    write_field(tmp_path / "valid" / "images", tmp_path / "valid" / "labels", "a", ["2 0.5 0.5 0.5 0.5", "1 0.2 0.2 0.1 0.1"])
    write_field(tmp_path / "test" / "images", tmp_path / "test" / "labels", "b", ["0 0.5 0.5 0.1 0.1"])
    assert is_field_set(tmp_path)
    names = read_kinds(tmp_path)
    (item,) = open_fields(tmp_path, "val")  # Roboflow calls it valid
    _, boxes = load_field(item, names)
    assert boxes.kinds.tolist() == [WHITE, RED] and boxes.types is None
    assert len(open_fields(tmp_path, None)) == 2  # every split


def test_flat_typed_set_and_a_dict_of_names(tmp_path):
    (tmp_path / "data.yaml").write_text("names:\n  0: neutrophil\n  1: Lymphocytes\n  2: red_cell\n")
    write_field(tmp_path / "images", tmp_path / "labels", "f", ["0 0.3 0.5 0.2 0.2", "1 0.7 0.5 0.2 0.2", "2 0.5 0.1 0.1 0.1"])
    (item,) = open_fields(tmp_path, None)
    _, boxes = load_field(item, read_kinds(tmp_path))
    assert boxes.kinds.tolist() == [WHITE, WHITE, RED]
    assert boxes.types.tolist() == ["neutrophil", "lymphocyte", ""]
    assert boxes.select(np.array([1])).types.tolist() == ["lymphocyte"]


def voc(objects):
    parts = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                    f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return f"<annotation><filename>x.jpg</filename>{parts}</annotation>"


def test_pascal_voc_as_bccd_ships(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    for name in ("BloodImage_00000", "BloodImage_00001"):
        Image.new("RGB", (64, 48), (230, 200, 210)).save(tmp_path / "JPEGImages" / f"{name}.jpg")
    (tmp_path / "Annotations" / "BloodImage_00000.xml").write_text(voc([("WBC", (10, 5, 30, 25)), ("RBC", (0, 0, 8, 8))]))
    (tmp_path / "Annotations" / "BloodImage_00001.xml").write_text(voc([("Platelets", (40, 40, 44, 44))]))
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("BloodImage_00001\n")
    assert is_field_set(tmp_path)
    names = read_kinds(tmp_path)
    assert names == ["Platelets", "RBC", "WBC"]
    first, _second = open_fields(tmp_path, None)
    _, boxes = load_field(first, names)
    np.testing.assert_allclose(boxes.xyxy, [[10, 5, 30, 25], [0, 0, 8, 8]])
    assert boxes.kinds.tolist() == [WHITE, RED]
    (only,) = open_fields(tmp_path, "test")
    assert only.image.stem == "BloodImage_00001"
    (tmp_path / "Annotations" / "BloodImage_00001.xml").write_text("<annotation><object><name>WBC</name></object>")
    with pytest.raises(BloodcellError, match="BloodImage_00001.xml: not a Pascal VOC annotation"):
        read_kinds(tmp_path)


def test_an_unknown_class_name_or_split_is_one_clear_error(tmp_path):
    (tmp_path / "classes.txt").write_text("WBC\nsmudge\n")
    write_field(tmp_path / "images" / "test", tmp_path / "labels" / "test", "f", ["0 0.5 0.5 0.2 0.2"])
    with pytest.raises(BloodcellError, match=r"classes.txt: unknown class 'smudge'"):
        read_kinds(tmp_path)
    (tmp_path / "classes.txt").write_text("WBC\n")
    with pytest.raises(BloodcellError, match="no train split"):
        open_fields(tmp_path, "train")
    assert not is_field_set(tmp_path / "images")


def test_boxes_of_classes_bloodcell_does_not_know_can_be_left_out(tmp_path):
    """With skip_unknown a set's smudge cells or blasts are read apart (``Boxes.ignored``), in YOLO and VOC
    layouts alike; without it they are refused, naming the option; a set of unknown classes only is refused."""
    (tmp_path / "classes.txt").write_text("WBC\nsmudge\nRBC\n")
    write_field(tmp_path / "images", tmp_path / "labels", "f", ["0 0.5 0.5 0.2 0.2", "1 0.25 0.25 0.1 0.1", "2 0.8 0.8 0.1 0.1"])
    with pytest.raises(BloodcellError, match=r"unknown class 'smudge'.*--skip-unknown"):
        read_kinds(tmp_path)
    names = read_kinds(tmp_path, skip_unknown=True)
    (item,) = open_fields(tmp_path, None)
    with pytest.raises(BloodcellError, match=r"f.txt: unknown class 'smudge'"):
        load_field(item, names)
    _, boxes = load_field(item, names, skip_unknown=True)
    assert boxes.kinds.tolist() == [WHITE, RED] and boxes.ignored_names == ("smudge",)
    np.testing.assert_allclose(boxes.ignored, [[16, 12, 24, 18]])
    assert boxes.select(np.array([True, False])).ignored_names == ("smudge",)
    # what adapt --data BOXED --skip-unknown learns from
    from bloodcell.inference.count import boxed_white_cells

    assert [origin.rpartition("#")[2] for _, _, origin in boxed_white_cells(tmp_path, skip_unknown=True)] == ["0"]
    with pytest.raises(BloodcellError, match="unknown class 'smudge'"):
        list(boxed_white_cells(tmp_path))
    (tmp_path / "classes.txt").write_text("smudge\nartefact\n")
    with pytest.raises(BloodcellError, match="none of its classes is a kind"):
        read_kinds(tmp_path, skip_unknown=True)
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    Image.new("RGB", (40, 30), (230, 200, 210)).save(voc / "JPEGImages" / "a.jpg")
    objects = "".join(f"<object><name>{n}</name><bndbox><xmin>{x}</xmin><ymin>1</ymin><xmax>{x + 5}</xmax><ymax>6</ymax></bndbox></object>"
                      for n, x in (("WBC", 1), ("blast", 20)))
    (voc / "Annotations" / "a.xml").write_text(f"<annotation><filename>a.jpg</filename>{objects}</annotation>")
    with pytest.raises(BloodcellError, match="unknown class 'blast'"):
        read_kinds(voc)
    (item,) = open_fields(voc, None)
    _, boxes = load_field(item, read_kinds(voc, skip_unknown=True), skip_unknown=True)
    assert boxes.kinds.tolist() == [WHITE] and boxes.ignored_names == ("blast",)


def test_a_detection_on_a_left_out_box_counts_neither_way():
    """VOC's rule for "difficult" objects: a detection that matches no true box of its kind but lies on a box
    of an unknown class is dropped from the ranking, neither a hit nor a false positive."""
    from bloodcell.evaluation.detection import detection_metrics
    from bloodcell.inference.detect import Detections

    found = [Detections(Boxes(np.array([[50, 50, 60, 60], [0, 0, 10, 10], [80, 0, 90, 10]], np.float32),
                              np.array([WHITE, WHITE, WHITE])), np.array([0.95, 0.9, 0.7], np.float32))]
    known = np.array([[0, 0, 10, 10]], np.float32)
    plain = detection_metrics(found, [Boxes(known, np.array([WHITE]))])["white_cell"]
    left_out = detection_metrics(found, [Boxes(known, np.array([WHITE]), ignored=np.array([[51, 50, 60, 61]], np.float32),
                                               ignored_names=("smudge",))])["white_cell"]
    assert plain["ap50"] == pytest.approx(0.5) and plain["detections"] == 3 and plain["precision"] == pytest.approx(1 / 3)
    assert left_out["ap50"] == pytest.approx(1.0) and left_out["detections"] == 2 and left_out["precision"] == pytest.approx(0.5)
    assert left_out["boxes"] == plain["boxes"] == 1


def test_boxes_to_review_lists_doubted_kinds_and_unlabelled_cells_only():
    """A box the detector reads as another kind (and not as its own) is listed with both kinds; a confident cell
    no box labels is listed; a box confirmed by its own kind, a weak detection, or one on a left-out box is not."""
    from bloodcell.evaluation.boxed_fields import boxes_to_review
    from bloodcell.inference.detect import Detections

    plate = KINDS.index("platelet")
    truth = Boxes(np.array([[0, 0, 40, 40], [50, 0, 90, 40], [100, 0, 140, 40], [0, 50, 40, 90]], np.float32),
                  np.array([WHITE, RED, RED, WHITE]), types=np.array(["", "", "", "monocyte"], dtype=object),
                  ignored=np.array([[200, 200, 230, 230]], np.float32), ignored_names=("smudge",))
    found = Detections(Boxes(np.array([[1, 1, 41, 40],      # red cell on box 0 (a white cell by its label)
                                       [50, 1, 90, 40],     # white cell on box 1, a red cell, but box 1 is also
                                       [51, 0, 90, 41],     #   found as a red cell: confirmed
                                       [100, 0, 139, 40],   # platelet on box 2, below the score for doubt
                                       [0, 50, 40, 91],     # red cell on the typed monocyte's box
                                       [300, 300, 330, 330],  # a confident platelet no box labels
                                       [400, 400, 430, 430],  # a weak white cell no box labels
                                       [201, 200, 230, 231]], np.float32),  # a white cell on the left-out box
                             np.array([RED, WHITE, RED, plate, RED, plate, WHITE, WHITE])),
                       np.array([0.8, 0.9, 0.5, 0.45, 0.7, 0.65, 0.4, 0.9], np.float32))
    rows = boxes_to_review([found], [truth], ["f.jpg"], thresholds=[0.3, 0.3, 0.3])
    assert [(r["issue"], r["labelled"], r["detector_kind"]) for r in rows] == [
        ("kind", "white_cell", "red_cell"), ("kind", "monocyte", "red_cell"), ("unlabelled", "", "platelet")]
    assert rows[0]["box"].tolist() == [0, 0, 40, 40] and rows[2]["detector_score"] == pytest.approx(0.65)
    assert boxes_to_review([Detections(Boxes(), np.zeros(0, np.float32))], [truth], ["f.jpg"], [0.3] * 3) == []


def cell(box, cls, score=0.9, to_check=False, kind="white_cell"):
    return {"kind": kind, "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3], "score": score,
            "class": cls if kind == "white_cell" else "", "confidence": score if kind == "white_cell" else "",
            "to_check": to_check}


def test_type_metrics_match_each_typed_cell_once_and_count_misses_as_wrong():
    names = ["eosinophil", "lymphocyte", "neutrophil"]
    truth = Boxes(np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [0, 40, 10, 50]], np.float32),
                  np.array([WHITE, WHITE, WHITE, RED]), np.array(["neutrophil", "lymphocyte", "neutrophil", ""]))
    cells = [cell((0, 0, 10, 10), "neutrophil", 0.8),    # right
             cell((1, 0, 10, 10), "eosinophil", 0.5),    # the same cell again, weaker: not matched twice
             cell((20, 0, 31, 10), "neutrophil", 0.9),   # a lymphocyte called a neutrophil
             cell((70, 70, 80, 80), "eosinophil", 0.7),  # nothing there: a false white cell
             cell((0, 40, 10, 50), "", kind="red_cell")]
    assert match_white_cells(cells, truth) == [0, 2, None]
    result = type_metrics([FieldResult("f", 100, 100, cells)], [truth], names)
    assert result["typed_cells"] == 3 and result["found"] == 2
    assert result["accuracy"] == pytest.approx(1 / 3)  # the third cell was not found
    assert result["accuracy_where_found"] == pytest.approx(0.5)
    assert result["balanced_accuracy"] == pytest.approx((0.5 + 0.0) / 2)
    assert result["macro_f1"] == pytest.approx((0.5 + 0.0) / 2)  # neutrophil: 1 right of 2 answered, of 2 true
    assert result["ece_where_found"] == pytest.approx(0.5 * abs(0.8 - 1) + 0.5 * abs(0.9 - 0))
    assert result["per_class"]["neutrophil"] == {"cells": 2, "found": 1, "right": 1}
    confusion = result["confusion"]
    assert confusion["true"] == ["lymphocyte", "neutrophil"]
    assert confusion["matrix"][1][confusion["answers"].index("not found")] == 1
    # count would report 2 eosinophils and 2 neutrophils of 4 white cells; the lab typed 2 neutrophils, 1 lymphocyte
    assert result["differential"]["eosinophil"] == {"true_share": 0.0, "counted_share": 0.5}
    assert result["differential_max_error"] == pytest.approx(0.5)
    # untyped fields have nothing to score
    assert type_metrics([FieldResult("f", 100, 100, cells)], [Boxes(truth.xyxy, truth.kinds)], names) is None


def typed_fields(root, pbc, per_class, types):
    """PBC images placed in a corner of a field twice their size, each with the white cell's box typed as ``types``
    says (the box: the shipped detector's best white cell on the image itself)."""
    from bloodcell.data.fields import fill_colour
    from bloodcell.inference.count import best_white_cell
    from bloodcell.inference.detect import load_detector

    detector = load_detector("default")
    names = sorted(set(types.values()))
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in [*names, "RBC"]))
    (root / "labels").mkdir()
    for cls, typed in types.items():
        for path in sorted((pbc / cls).iterdir())[:per_class]:
            image = np.asarray(Image.open(path).convert("RGB"))
            box, _ = best_white_cell(detector.detect(image))
            h, w = image.shape[:2]
            field = np.empty((2 * h, 2 * w, 3), np.uint8)
            field[:] = fill_colour(image)
            field[h:, :w] = image  # bottom left
            Image.fromarray(field).save(root / "images" / f"{cls}_{path.stem}.png")
            x0, y0, x1, y1 = box[0], box[1] + h, box[2], box[3] + h
            (root / "labels" / f"{cls}_{path.stem}.txt").write_text(
                f"{names.index(typed)} {(x0 + x1) / 4 / w} {(y0 + y1) / 4 / h} {(x1 - x0) / 2 / w} {(y1 - y0) / 2 / h}\n")


def test_evaluate_scores_the_types_of_a_labs_boxed_fields(tmp_path):
    from typer.testing import CliRunner

    from bloodcell.cli.main import app

    pbc = require(PBC224)
    classes = ["eosinophil", "lymphocyte", "neutrophil"]
    typed_fields(tmp_path / "right", pbc, 4, {c: c for c in classes})
    typed_fields(tmp_path / "swapped", pbc, 4, dict(zip(classes, classes[1:] + classes[:1])))
    runner = CliRunner()
    scores = {}
    for name in ("right", "swapped"):
        out = tmp_path / f"eval-{name}"
        result = runner.invoke(app, ["evaluate", "--model", "default", "--data", str(tmp_path / name), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "Type accuracy" in result.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["fields"] == 12 and metrics["detection"]["white_cell"]["boxes"] == 12
        assert metrics["types"]["typed_cells"] == 12 and metrics["types"]["found"] >= 11
        scores[name] = metrics["types"]["accuracy"]
        assert (out / "cells.csv").read_text().count("white_cell") >= 11
        assert (out / "confusion_matrix.png").is_file()
    assert scores["right"] >= 0.75 and scores["swapped"] <= 0.25
    # the lab boxed its eosinophils as a class bloodcell does not know: refused in one line, or left out
    smudged = tmp_path / "smudged"
    typed_fields(smudged, pbc, 2, {c: c for c in classes})
    (smudged / "classes.txt").write_text("smudge\nlymphocyte\nneutrophil\nRBC\n")  # eosinophil (0) renamed
    result = runner.invoke(app, ["evaluate", "--model", "default", "--data", str(smudged), "--out", str(tmp_path / "s0")])
    assert result.exit_code == 2 and "unknown class 'smudge'" in result.output and "--skip-unknown" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["evaluate", "--model", "default", "--data", str(smudged), "--out", str(tmp_path / "s1"),
                                 "--skip-unknown"])
    assert result.exit_code == 0, result.output
    assert "left out" in result.output and "smudge 2 box(es)" in result.output
    metrics = json.loads((tmp_path / "s1" / "metrics.json").read_text())
    assert metrics["left_out"] == {"smudge": 2} and metrics["detection"]["white_cell"]["boxes"] == 4
    assert metrics["types"]["typed_cells"] == 4
    # the same set with those boxes deleted: the two eosinophils found are now false white cells
    for label in (smudged / "labels").glob("eosinophil_*.txt"):
        label.write_text("")
    result = runner.invoke(app, ["evaluate", "--model", "default", "--data", str(smudged), "--out", str(tmp_path / "s2"),
                                 "--skip-unknown"])
    deleted = json.loads((tmp_path / "s2" / "metrics.json").read_text())["detection"]["white_cell"]
    assert deleted["detections"] == metrics["detection"]["white_cell"]["detections"] + 2
    assert deleted["precision"] < metrics["detection"]["white_cell"]["precision"]
    # ... and the review lists them as cells no box labels; no box's kind is doubted
    import csv
    from pathlib import Path

    review = list(csv.DictReader((tmp_path / "s2" / "boxes_to_review.csv").read_text().splitlines()))
    eosinophils = {p.stem for p in (smudged / "labels").glob("eosinophil_*.txt")}
    assert eosinophils <= {Path(r["image"]).stem for r in review if r["issue"] == "unlabelled" and r["detector_kind"] == "white_cell"}
    assert not [r for r in review if r["issue"] == "kind"]
    # the neutrophils' boxes labelled as red cells: each listed once as a kind to check, white cell by the detector
    neutrophils = sorted((smudged / "labels").glob("neutrophil_*.txt"))
    for label in neutrophils:
        label.write_text("3" + label.read_text()[1:])  # class 3: RBC
    result = runner.invoke(app, ["evaluate", "--model", "default", "--data", str(smudged), "--out", str(tmp_path / "s3"),
                                 "--skip-unknown"])
    assert result.exit_code == 0 and "Labels worth a second look" in " ".join(result.output.split())
    assert "Suggested fixes in label_fixes.json" in " ".join(result.output.split())
    review = list(csv.DictReader((tmp_path / "s3" / "boxes_to_review.csv").read_text().splitlines()))
    swapped = [r for r in review if r["issue"] == "kind"]
    assert sorted(Path(r["image"]).stem for r in swapped) == [p.stem for p in neutrophils]
    assert {(r["labelled"], r["detector_kind"]) for r in swapped} == {("red_cell", "white_cell")}
    assert json.loads((tmp_path / "s3" / "metrics.json").read_text())["review"] == {
        "file": "boxes_to_review.csv", "kind": 2, "unlabelled": len(review) - 2, "sheet": "boxes_to_review.png",
        "label_fixes": "label_fixes.json"}
    assert all(r["line"] == "1" for r in swapped)  # each neutrophil's one box is its file's first line
    # the review's suggested fixes, passed back: the boxes are white cells again, the label files untouched
    suggested = json.loads((tmp_path / "s3" / "label_fixes.json").read_text())["fixes"]
    lines = [f for f in suggested if "line" in f]
    assert sorted(f["label_file"] for f in lines) == [f"labels/{p.name}" for p in neutrophils]
    assert {(f["line"], f["labelled"], f["kind"]) for f in lines} == {(1, "red_cell", "white_cell")}
    # ... and each cell no box labels is added as the detector found it: the deleted eosinophils among them
    added = [f for f in suggested if "line" not in f]
    assert len(added) == len(review) - 2
    assert {f"labels/{stem}.txt" for stem in eosinophils} <= {f["label_file"] for f in added if f["kind"] == "white_cell"}
    before = {p: p.read_text() for p in [*neutrophils, *(smudged / "labels").glob("eosinophil_*.txt")]}
    result = runner.invoke(app, ["evaluate", "--model", "default", "--data", str(smudged), "--out", str(tmp_path / "s4"),
                                 "--skip-unknown", "--label-fixes", str(tmp_path / "s3" / "label_fixes.json")])
    assert result.exit_code == 0, result.output
    assert f"Scored with {len(suggested)} label line(s) fixed by" in " ".join(result.output.split())
    fixed = json.loads((tmp_path / "s4" / "metrics.json").read_text())
    assert fixed["label_fixes"]["lines"] == len(suggested)
    assert fixed["review"]["kind"] == 0 and fixed["review"]["unlabelled"] == 0
    assert not (tmp_path / "s4" / "label_fixes.json").exists()
    white = sum(f["kind"] == "white_cell" for f in added)
    assert fixed["detection"]["white_cell"]["boxes"] == 4 + white and fixed["detection"]["white_cell"]["precision"] == 1.0
    assert {p: p.read_text() for p in before} == before
    drawn = min(48, len(review))  # one card of 160 x 190 px for each of the first 48 boxes, 8 to a row
    with Image.open(tmp_path / "s3" / "boxes_to_review.png") as sheet:
        assert sheet.size == (160 * min(8, drawn), 190 * -(-drawn // 8))
    # a class folder set is still scored as crops, and --split is refused there
    result = runner.invoke(app, ["evaluate", "--model", "default", "--data", str(pbc), "--split", "test", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--split is for boxed fields" in result.output


def test_adapt_learns_from_a_labs_boxed_fields(tmp_path):
    """Typed boxes are the lab's labelled cells, cut out as count cuts them; every boxed white cell can be an unlabelled one."""
    from bloodcell.training.adapt import AdaptConfig
    from bloodcell.workflows.adapt import adapt_model

    pbc = require(PBC224)
    typed_fields(tmp_path / "typed", pbc, 5, {"lymphocyte": "lymphocyte", "neutrophil": "neutrophil"})
    lines: list[str] = []
    summary = adapt_model("default", tmp_path / "adapted", tmp_path / "typed", tmp_path / "typed", AdaptConfig(steps=3),
                          folds=0, export=False, log=lines.append, suggest=3)
    assert summary["labelled_per_class"] == {"lymphocyte": 5, "neutrophil": 5}
    assert summary["unlabelled_images"] == 10
    assert any("10 white cells cut from the boxed fields" in line for line in lines)
    contract = json.loads((tmp_path / "adapted" / "model.json").read_text())
    assert contract["adapted"]["labelled"] == str(tmp_path / "typed")
    # fields whose white cells are boxed but not typed teach no classes: one clear line
    (tmp_path / "typed" / "classes.txt").write_text("WBC\nRBC\n")
    with pytest.raises(BloodcellError, match="no white cell typed"):
        adapt_model("default", tmp_path / "again", tmp_path / "typed", None, AdaptConfig(steps=1), folds=0, export=False,
                    log=lines.append)


def test_adapt_on_unlabelled_whole_fields_takes_the_white_cells_the_detector_finds(tmp_path):
    from bloodcell.training.adapt import AdaptConfig
    from bloodcell.workflows.adapt import adapt_model

    pbc = require(PBC224)
    typed_fields(tmp_path / "set", pbc, 3, {"lymphocyte": "lymphocyte", "monocyte": "monocyte"})
    lines: list[str] = []
    summary = adapt_model("default", tmp_path / "adapted", None, tmp_path / "set" / "images", AdaptConfig(steps=2),
                          export=False, log=lines.append, suggest=2, fields=True)
    assert summary["unlabelled_images"] >= 6  # one white cell per field at least
    assert any("white cells found in 6 fields" in line for line in lines)
    assert json.loads((tmp_path / "adapted" / "model.json").read_text())["adapted"]["unlabelled_fields"] is True
    rows = (tmp_path / "adapted" / "to_label.csv").read_text()
    assert "#" in rows  # each cell named by its field and box
    # by default adapt looks first, and reads them as fields too
    lines.clear()
    auto = adapt_model("default", tmp_path / "auto", None, tmp_path / "set" / "images", AdaptConfig(steps=2),
                       export=False, log=lines.append, suggest=0)
    assert auto["unlabelled_fields"] is True and auto["unlabelled_images"] == summary["unlabelled_images"]
    assert any("images looked at are whole fields" in line for line in lines)
    # read as single cells on request: adapt says they look like fields
    lines.clear()
    plain = adapt_model("default", tmp_path / "plain", None, tmp_path / "set" / "images", AdaptConfig(steps=2),
                        export=False, log=lines.append, suggest=0, fields=False)
    assert plain["unlabelled_fields"] is False and plain["unlabelled_images"] == 6
    assert any("looks like whole fields" in line for line in lines)


def test_adapt_on_class_folders_of_whole_fields_learns_from_their_white_cells(tmp_path):
    """A lab's labelled photographs of fields, one white cell each, sorted into class folders (as evaluate
    reads them): adapt cuts each field's white cell out as count does, rather than learning whole fields."""
    from bloodcell.training.adapt import AdaptConfig
    from bloodcell.workflows.adapt import adapt_model

    pbc = require(PBC224)
    fields = whole_fields(tmp_path / "fields", {cls: sorted((pbc / cls).glob("*.jpg"))[:5]
                                                for cls in ("lymphocyte", "neutrophil")})
    lines: list[str] = []
    summary = adapt_model("default", tmp_path / "adapted", fields, None, AdaptConfig(steps=2), folds=0, export=False,
                          log=lines.append)
    assert summary["labelled_fields"] is True and sum(summary["labelled_per_class"].values()) >= 8
    assert any("images looked at are whole fields" in line for line in lines)
    assert json.loads((tmp_path / "adapted" / "model.json").read_text())["adapted"]["labelled_fields"] is True
    plain = adapt_model("default", tmp_path / "plain", fields, None, AdaptConfig(steps=2), folds=0, export=False,
                        log=lambda line: None, fields=False)
    assert plain["labelled_fields"] is False and plain["labelled_per_class"] == {"lymphocyte": 5, "neutrophil": 5}
