"""Whole fields: box sets, the detector's letterbox and augmentation, post-processing against
torchvision, AP50, export, training and resume, `bloodcell count`, and /v1/count."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell.core.errors import BloodcellError
from bloodcell.data.fields import (
    KINDS,
    Boxes,
    FieldItem,
    clip_boxes,
    flip_rotate,
    letterbox,
    load_field,
    mosaic,
    open_fields,
    read_boxes,
    read_kinds,
    read_label_fixes,
    training_sample,
)
from bloodcell.evaluation.detection import detection_metrics, voc_ap
from bloodcell.inference.detect import Detections, box_iou, nms, postprocess
from bloodcell.models.detector import DetectorContract, DetectorGraph, build_detector

from .conftest import SHARED, require

FIELDS = SHARED / "fields"
TINY = DetectorContract(image_size=128, fpn_channels=32, head_convs=1, score_threshold=0.05, cross_kind_iou=1.0, nested={})


def random_boxes(rng, n, size=200):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(5, 60, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


# --- boxes, letterbox, augmentation -----------------------------------------------------------


def test_label_fixes_correct_lines_as_they_are_read_and_never_touch_the_files(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        Image.new("RGB", (100, 100), (230, 200, 210)).save(tmp_path / "images" / split / "a.png")
    (tmp_path / "classes.txt").write_text("white_cell\nred_cell\nplatelet\n")
    text = "1 0.5 0.5 0.4 0.4\n1 0.2 0.2 0.1 0.1\n1 0.5 0.3 0.4 0.2\n0 0.8 0.8 0.1 0.1\n"
    (tmp_path / "labels" / "train" / "a.txt").write_text(text)
    (tmp_path / "labels" / "val" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    fixes = [  # a white cell labelled as a red cell, boxed as two: the first becomes the whole cell, the other goes
        {"label_file": "labels/train/a.txt", "line": 1, "reads": "1 0.5 0.5 0.4 0.4", "kind": "white_cell",
         "box": [0.5, 0.4, 0.4, 0.4]},
        {"label_file": "labels/train/a.txt", "line": 3, "reads": "1 0.5 0.3 0.4 0.2", "kind": "none"},
        {"label_file": "labels/train/a.txt", "line": 4, "reads": "0 0.8 0.8 0.1 0.1", "kind": "platelet"},
        {"label_file": "labels/train/a.txt", "kind": "red_cell", "box": [0.1, 0.9, 0.2, 0.2]}]  # a cell left out
    path = tmp_path / "fixes.json"
    path.write_text(json.dumps({"fixes": fixes}))
    kinds = read_kinds(tmp_path)
    items = open_fields(tmp_path, None, read_label_fixes(path, tmp_path))
    assert [len(item.fixes) for item in items] == [4, 0]  # train's file, then val's
    boxes = read_boxes(items[0], 100, 100, kinds)
    assert [KINDS[k] for k in boxes.kinds] == ["white_cell", "red_cell", "platelet", "red_cell"]
    np.testing.assert_allclose(boxes.xyxy[0], [30, 20, 70, 60])
    np.testing.assert_allclose(boxes.xyxy[1], [15, 15, 25, 25])
    np.testing.assert_allclose(boxes.xyxy[3], [0, 80, 20, 100])
    assert boxes.lines.tolist() == [1, 2, 4, 0]  # each box's line, 0 for the added one
    assert (tmp_path / "labels" / "train" / "a.txt").read_text() == text  # the user's labels are unchanged
    assert read_boxes(open_fields(tmp_path, "train")[0], 100, 100, kinds).kinds.tolist() == [1, 1, 1, 0]
    # a label file edited since the fix was written stops the read, naming the file and the line
    (tmp_path / "labels" / "train" / "a.txt").write_text(text.replace("1 0.5 0.3", "2 0.5 0.3"))
    with pytest.raises(BloodcellError, match=r"a.txt:3: reads '2 0.5 0.3 0.4 0.2', not '1 0.5 0.3 0.4 0.2'"):
        read_boxes(open_fields(tmp_path, "train", read_label_fixes(path, tmp_path))[0], 100, 100, kinds)
    (tmp_path / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.4 0.4\n")
    with pytest.raises(BloodcellError, match="has 1 lines; its label fix names line 3"):
        read_boxes(open_fields(tmp_path, "train", read_label_fixes(path, tmp_path))[0], 100, 100, kinds)
    # fixes of another set, a line fixed twice, an unknown kind: refused in one line
    path.write_text(json.dumps([{**fixes[0], "label_file": "labels/test/b.txt"}]))
    with pytest.raises(BloodcellError, match=r"labels/test/b.txt is not a label file of"):
        read_label_fixes(path, tmp_path)
    assert read_label_fixes(path, tmp_path, only_present=True) == []
    path.write_text(json.dumps([fixes[0], fixes[0]]))
    with pytest.raises(BloodcellError, match="line 1 is fixed twice"):
        read_label_fixes(path, tmp_path)
    path.write_text(json.dumps([{**fixes[0], "kind": "monocyte"}]))
    with pytest.raises(BloodcellError, match="fix 1, kind: .*'monocyte' is not a kind"):
        read_label_fixes(path, tmp_path)
    path.write_text(json.dumps([fixes[0], {**fixes[-1], "box": None}]))
    with pytest.raises(BloodcellError, match="fix 2, .*needs its kind and its box"):
        read_label_fixes(path, tmp_path)
    path.write_text(json.dumps([{k: v for k, v in fixes[0].items() if k != "reads"}]))
    with pytest.raises(BloodcellError, match="fix 1, .*says what the line reads"):
        read_label_fixes(path, tmp_path)


def test_the_benchmarks_label_fixes_still_read_as_the_shared_fields_hold_them():
    root = require(FIELDS)
    fixes = read_label_fixes(Path(__file__).parents[1] / "benchmarks" / "fields_label_fixes.json", root)
    kinds = read_kinds(root)
    for split in ("train", "val", "test"):
        fixed = [item for item in open_fields(root, split, fixes) if item.fixes]
        assert fixed, split
        for item in fixed:  # each fix's line still reads as listed, and its box becomes the kind it names
            boxes = read_boxes(item, 575, 575, kinds)
            dropped = {fix.line for fix in item.fixes if fix.kind == "none"}
            kept = [n for n in range(1, len(item.labels.read_text().splitlines()) + 1) if n not in dropped]
            added = [fix for fix in item.fixes if fix.line is None]
            assert len(boxes) == len(kept) + len(added)
            assert boxes.lines.tolist() == kept + [0] * len(added)
            for fix in item.fixes:
                if fix.kind != "none":
                    at = kept.index(fix.line) if fix.line else len(kept) + added.index(fix)
                    assert KINDS[boxes.kinds[at]] == fix.kind


def test_yolo_labels_become_pixel_boxes_and_a_bad_line_is_named(tmp_path):
    label = tmp_path / "f.txt"
    label.write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.1 0.1\n")
    boxes = read_boxes(FieldItem(tmp_path / "f.jpg", label), 200, 100, ["white_cell", "red_cell", "platelet"])
    np.testing.assert_allclose(boxes.xyxy[0], [80, 30, 120, 70])
    assert boxes.kinds.tolist() == [0, 1]
    # classes.txt in another order maps onto the same kinds
    boxes = read_boxes(FieldItem(tmp_path / "f.jpg", label), 200, 100, ["platelet", "white_cell", "red_cell"])
    assert boxes.kinds.tolist() == [KINDS.index("platelet"), KINDS.index("white_cell")]
    label.write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(BloodcellError, match=r"f.txt:1: expected"):
        read_boxes(FieldItem(tmp_path / "f.jpg", label), 200, 100, list(KINDS))
    label.write_text("7 0.5 0.5 0.2 0.2\n")
    with pytest.raises(BloodcellError, match="class 7 is not in"):
        read_boxes(FieldItem(tmp_path / "f.jpg", label), 200, 100, list(KINDS))


def test_letterbox_maps_boxes_back_to_the_field():
    image = np.full((300, 600, 3), 200, np.uint8)
    image[100:150, 400:500] = 20  # a dark box
    canvas, frame = letterbox(image, 256)
    assert canvas.shape == (256, 256, 3) and frame.scale == pytest.approx(256 / 600, rel=1e-3)
    ys, xs = np.nonzero(canvas[..., 0] < 100)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    np.testing.assert_allclose(frame.to_original(found, 600, 300)[0], [400, 100, 500, 150], atol=3)
    assert tuple(canvas[0, 0]) == (200, 200, 200)  # padded with the field's own background


def test_flips_and_turns_keep_each_box_on_its_cell():
    rng = np.random.default_rng(0)
    for _ in range(12):
        image = np.zeros((64, 64, 3), np.uint8)
        image[10:20, 30:50] = 255
        out, boxes = flip_rotate(image, Boxes(np.array([[30, 10, 50, 20]], np.float32), np.array([0])), rng)
        ys, xs = np.nonzero(out[..., 0])
        np.testing.assert_allclose(boxes.xyxy[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_crops_drop_cells_mostly_outside_and_clip_the_rest():
    boxes = Boxes(np.array([[0, 0, 10, 10], [85, 85, 105, 105], [95, 0, 130, 10]], np.float32), np.array([0, 1, 2]))
    kept = clip_boxes(boxes, 0, 0, 100, 100)
    assert kept.kinds.tolist() == [0, 1]  # the third is 14% inside: dropped
    np.testing.assert_allclose(kept.xyxy[1], [85, 85, 100, 100])
    # A lower bar keeps slivers, as the data's own labels at a field's edge do.
    sliver = clip_boxes(boxes, 0, 0, 100, 100, min_visible=0.1)
    assert sliver.kinds.tolist() == [0, 1, 2]
    np.testing.assert_allclose(sliver.xyxy[2], [95, 0, 100, 10])
    # One bar per kind: slivers kept for kind 2 only.
    by_kind = clip_boxes(Boxes(boxes.xyxy[[2, 2]], np.array([1, 2])), 0, 0, 100, 100, min_visible=np.array([0.35, 0.35, 0.1]))
    assert by_kind.kinds.tolist() == [2]


def test_zoomed_out_samples_tile_fields_and_keep_boxes_inside():
    rng = np.random.default_rng(1)
    image = np.full((200, 200, 3), 220, np.uint8)
    image[50:100, 50:100] = (120, 40, 160)
    field = (image, Boxes(np.array([[50, 50, 100, 100]], np.float32), np.array([0])))
    out, boxes = mosaic([field] * 4, size=128, crop=128, zoom=0.4, rng=rng)
    assert out.shape == (128, 128, 3)
    assert len(boxes) >= 4  # a 51 px tile: at least 2 x 2 copies of the cell in view
    assert (boxes.xyxy >= 0).all() and (boxes.xyxy <= 128).all()
    for box in boxes.xyxy.astype(int):  # every box lies on the purple cell
        assert out[(box[1] + box[3]) // 2, (box[0] + box[2]) // 2, 1] < 100
    sample, boxes = training_sample([field], 128, 96, rng)
    assert sample.shape == (96, 96, 3) and sample.dtype == np.uint8
    assert set(boxes.kinds.tolist()) <= {0}


# --- post-processing and metrics against the libraries ------------------------------------------


def test_nms_matches_torchvision():
    from torchvision.ops import nms as tv_nms

    rng = np.random.default_rng(2)
    for _ in range(5):
        boxes = random_boxes(rng, 80)
        scores = rng.uniform(0, 1, 80).astype(np.float32)
        for iou in (0.3, 0.5, 0.7):
            expected = tv_nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
            np.testing.assert_array_equal(nms(boxes, scores, iou), expected)
    # thousands of boxes (a large field read on tiles) are suppressed in blocks of rows: the same boxes kept
    boxes = random_boxes(rng, 3000, size=1500)
    scores = rng.uniform(0, 1, 3000).astype(np.float32)
    expected = tv_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), expected)
    from torchvision.ops import box_iou as tv_iou

    a, b = random_boxes(rng, 7), random_boxes(rng, 9)
    np.testing.assert_allclose(box_iou(a, b), tv_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy(), atol=1e-6)


def test_blocked_greedy_suppression_keeps_what_one_matrix_keeps():
    from bloodcell.inference.detect import greedy_keep, nested_suppression

    rng = np.random.default_rng(5)
    boxes = random_boxes(rng, 300)
    order = np.argsort(-rng.uniform(0, 1, 300), kind="stable")
    ranked = boxes[order]
    matrix = box_iou(ranked, ranked) > 0.4
    whole = greedy_keep(300, lambda r, c: matrix[np.ix_(r, c)], block=300)
    for block in (1, 7, 64):
        np.testing.assert_array_equal(greedy_keep(300, lambda r, c: matrix[np.ix_(r, c)], block=block), whole)
    # and what the plain greedy loop keeps
    dropped = np.zeros(300, bool)
    for i in range(300):
        if not dropped[i]:
            dropped[i + 1 :] |= matrix[i, i + 1 :]
    np.testing.assert_array_equal(whole, np.flatnonzero(~dropped))
    kept = nested_suppression(boxes, rng.uniform(0, 1, 300), 0.7)
    assert len(np.unique(kept)) == len(kept) and 0 < len(kept) < 300


def test_exported_graph_and_postprocess_give_torchvisions_fcos_detections():
    torch.manual_seed(0)
    model = build_detector(TINY).eval()
    with torch.no_grad():  # a head that fires: raise the class logits' bias so many locations pass the threshold
        model.head.classification_head.cls_logits.bias.fill_(0.0)
    graph = DetectorGraph(model, TINY).eval()
    image = np.random.default_rng(3).integers(0, 256, (1, 3, 128, 128), dtype=np.uint8)
    with torch.no_grad():
        boxes, scores = graph(torch.from_numpy(image))
        reference = model([torch.from_numpy(image[0]).float() / 255])[0]
    kept, kinds, values = postprocess(boxes[0].numpy(), scores[0].numpy(), TINY)
    assert len(values) > 10
    order = np.lexsort((kinds, -values))
    ref_order = np.lexsort((reference["labels"].numpy(), -reference["scores"].numpy()))
    np.testing.assert_allclose(values[order], reference["scores"].numpy()[ref_order], atol=1e-5)
    np.testing.assert_array_equal(kinds[order], reference["labels"].numpy()[ref_order])
    np.testing.assert_allclose(kept[order], reference["boxes"].numpy()[ref_order], atol=1e-3)


def test_a_white_cell_typed_as_a_platelet_is_sent_to_check():
    """The detector found a nucleated cell: a classifier answering "platelet" for it contradicts the detector,
    so that cell goes to "to check", out of the counts, even when the classifier is sure."""
    from bloodcell.core.classes import CLASS_NAMES
    from bloodcell.inference.count import FieldCounter

    class Sure:  # a stand-in classifier: sure of one class per crop, in order, inside the training lab's range
        class_names = CLASS_NAMES

        def __init__(self, answers):
            self.answers = answers

        def scores(self, crops):
            probs = np.full((len(crops), 8), 0.01, np.float32)
            for i, name in enumerate(self.answers[: len(crops)]):
                probs[i, CLASS_NAMES.index(name)] = 0.93
            return probs, np.full(len(crops), 0.5, np.float32)

    field = np.full((120, 160, 3), 230, np.uint8)
    boxes = Boxes(np.array([[10, 10, 40, 40], [60, 60, 90, 90], [100, 20, 110, 30]], np.float32), np.array([0, 0, 2]))
    found = [Detections(boxes, np.array([0.9, 0.8, 0.7], np.float32))]
    result = FieldCounter(None, Sure(["neutrophil", "platelet"])).type_cells([field], ["f.png"], found)[0]
    white = [c for c in result.cells if c["kind"] == "white_cell"]
    assert [(c["class"], c["to_check"]) for c in white] == [("neutrophil", False), ("platelet", True)]
    counts = result.counts(list(CLASS_NAMES))
    assert counts["neutrophil"] == 1 and counts["platelet"] == 0 and counts["to_check"] == 1 and counts["platelets"] == 1


def test_a_white_cell_cut_by_the_fields_edge_is_typed_but_sent_to_check():
    """Only part of such a cell is in the photograph (its box is short across the edge it touches): it keeps
    its class and goes to "to check", out of the counts. A whole cell at the edge, or an oval one inside, stays."""
    from bloodcell.core.classes import CLASS_NAMES
    from bloodcell.inference.count import FieldCounter, cut_by_edge

    class Sure:
        class_names = CLASS_NAMES

        def scores(self, crops):
            probs = np.full((len(crops), 8), 0.01, np.float32)
            probs[:, CLASS_NAMES.index("lymphocyte")] = 0.93
            return probs, np.full(len(crops), 0.5, np.float32)

    field = np.full((120, 160, 3), 230, np.uint8)
    xyxy = np.array([[0, 20, 18, 50],       # cut by the left edge: 18 of 30 px wide
                     [0, 60, 30, 90],       # touches the left edge, whole (as wide as high)
                     [60, 10, 75, 40],      # narrow, but inside the field
                     [100, 106, 130, 120],  # cut by the bottom edge
                     [142, 70, 160, 100]],  # cut by the right edge
                    np.float32)
    found = [Detections(Boxes(xyxy, np.zeros(5, np.int64)), np.full(5, 0.9, np.float32))]
    result = FieldCounter(None, Sure()).type_cells([field], ["f.png"], found)[0]
    assert [c["cut_by_edge"] for c in result.cells] == [True, False, False, True, True]
    assert [c["to_check"] for c in result.cells] == [True, False, False, True, True]
    assert all(c["class"] == "lymphocyte" for c in result.cells)
    counts = result.counts(list(CLASS_NAMES))
    assert counts["lymphocyte"] == 2 and counts["to_check"] == 3
    assert not cut_by_edge([1, 1, 31, 31], 160, 120) and cut_by_edge([1, 1, 31, 20], 160, 120)


def test_fields_are_grouped_into_slides_by_their_folder(tmp_path):
    """A slide is the folder holding its fields, named relative to the folder given; each slide has its own
    differential, with the cells to check left out as in the run's."""
    from bloodcell.inference.count import FieldResult, slide_differentials, slide_of

    root = tmp_path / "smears"
    (root / "patient1" / "s1").mkdir(parents=True)
    assert slide_of(root, str(root / "patient1" / "s1" / "f.jpg")) == "patient1/s1"
    assert slide_of(root, str(root / "f.jpg")) == "smears"  # fields directly in the folder given
    assert slide_of(root / "patient1" / "s1" / "f.jpg", str(root / "patient1" / "s1" / "f.jpg")) == "s1"  # a file given alone
    assert slide_of(".", "f.jpg") == Path.cwd().name

    def field(slide, *classes, to_check=()):
        cells = [{"kind": "white_cell", "class": c, "to_check": i in to_check} for i, c in enumerate(classes)]
        cells.append({"kind": "red_cell", "class": "", "to_check": False})
        return FieldResult(f"{slide}/x.jpg", 10, 10, cells, slide=slide)

    slides = slide_differentials([field("a", "neutrophil", "lymphocyte"), field("b", "monocyte", "neutrophil", to_check=(1,)),
                                  field("a", "neutrophil"), field("b")])
    assert [s["slide"] for s in slides] == ["a", "b"]
    a, b = slides
    assert (a["fields"], a["white_cells"], a["red_cells"], a["white_cell_percent"]["neutrophil"]) == (2, 3, 2, 66.7)
    assert (b["fields"], b["white_cells"], b["to_check"], b["fields_without_white_cells"]) == (2, 1, 1, 1)
    assert b["white_cell_percent"]["monocyte"] == 100.0 and b["white_cell_percent_95"]["monocyte"] == [2.5, 100.0]


def in_aperture(smear: np.ndarray, radius: float, frame: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, int, int]:
    """``smear`` centred in a dark frame, seen through a round aperture of ``radius``: a photo through the eyepiece."""
    rng = np.random.default_rng(seed)
    height, width = frame
    photo = rng.normal(10, 3, (height, width, 3))
    top, left = (height - smear.shape[0]) // 2, (width - smear.shape[1]) // 2
    yy, xx = np.mgrid[:height, :width]
    inside = np.hypot(yy - height / 2, xx - width / 2) < radius
    placed = np.zeros_like(photo)
    placed[top : top + smear.shape[0], left : left + smear.shape[1]] = smear
    photo[inside] = placed[inside]
    return np.clip(photo, 0, 255).astype(np.uint8), left, top


def test_the_field_of_view_is_the_smear_inside_a_dark_surround():
    """An eyepiece's round aperture or a black border is painted in the smear's colour and boxed out;
    a smear without one, dark nuclei at its edge included, is left alone, as is a photo dark all over."""
    from bloodcell.data.fields import field_of_view

    rng = np.random.default_rng(1)
    smear = np.empty((360, 360, 3), np.uint8)
    smear[:] = (226, 214, 204)
    yy, xx = np.mgrid[:360, :360]
    for cy, cx in [(180, 180), (60, 300), (0, 120), (359, 359)]:  # nuclei, two of them cut by the edge
        smear[np.hypot(yy - cy, xx - cx) < 30] = (105, 55, 150)
    smear = np.clip(smear + rng.normal(0, 3, smear.shape), 0, 255).astype(np.uint8)
    assert field_of_view(smear) is None
    bordered = smear.copy()
    bordered[:24] = 0  # a black strip, as some fields are padded
    filled, box = field_of_view(bordered)
    assert box[0] == 0 and 20 <= box[1] <= 32 and box[2:] == (360, 360)
    assert np.abs(filled[:20].astype(int) - (226, 214, 204)).max() <= 8 and (filled[40:] == bordered[40:]).all()
    photo, _, _ = in_aperture(smear, 170, (480, 640))
    filled, (x0, y0, x1, y1) = field_of_view(photo)
    assert abs(x0 - (320 - 170)) <= 8 and abs(x1 - (320 + 170)) <= 8 and abs(y0 - (240 - 170)) <= 8 and abs(y1 - (240 + 170)) <= 8
    assert np.abs(filled[5, 5].astype(int) - (226, 214, 204)).max() <= 8  # the surround now looks like the smear
    assert (filled[240, 320] == photo[240, 320]).all() and photo.min() < 5
    crowded = smear.copy()  # at a high magnification cells cover most of the aperture: paint the background
    for cy, cx in [(90, 90), (90, 270), (270, 90), (270, 270), (180, 180)]:
        crowded[np.hypot(yy - cy, xx - cx) < 65] = (200, 150, 170)  # 65% of the aperture
    assert np.median(crowded.reshape(-1, 3), axis=0)[0] < 210  # the plain median is a cell's colour
    filled, _ = field_of_view(in_aperture(crowded, 170, (480, 640))[0])
    assert np.abs(filled[5, 5].astype(int) - (226, 214, 204)).max() <= 8
    dark = np.zeros((200, 200, 3), np.uint8)
    dark[90:110, 90:110] = 200
    assert field_of_view(dark) is None


def test_the_shipped_detector_reads_a_photo_through_the_eyepiece_on_the_smear():
    """A field seen through a round aperture: the same white cell is found, in the photo's pixels, and no
    cell is found in the dark (which, read as it is, gives red cells and platelets)."""
    detector = shipped_detector()
    field, _ = load_field(min(open_fields(require(FIELDS), "test"), key=lambda i: i.image.name), read_kinds(FIELDS))
    plain = detector.detect(field)
    photo, left, top = in_aperture(field, 0.47 * field.shape[0], (field.shape[0] + 120, field.shape[1] * 4 // 3 + 160))
    found = detector.detect(photo)
    height, width = photo.shape[:2]
    centres = (found.boxes.xyxy[:, :2] + found.boxes.xyxy[:, 2:]) / 2
    assert (np.hypot(centres[:, 0] - width / 2, centres[:, 1] - height / 2) < 1.1 * 0.47 * field.shape[0]).all()  # rim cells; as it is, 1.42
    assert (found.boxes.kinds == 2).sum() <= (plain.boxes.kinds == 2).sum()  # read as it is, the dark gives a platelet
    white = found.boxes.xyxy[found.boxes.kinds == 0] - np.array([left, top, left, top], np.float32)
    expected = plain.boxes.xyxy[plain.boxes.kinds == 0]
    assert len(white) == len(expected) >= 1
    assert box_iou(white, expected).max(1).min() > 0.7


def test_one_cell_is_counted_once_across_kinds():
    contract = DetectorContract(score_threshold=0.1, cross_kind_iou=0.7)
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [50, 50, 60, 60]], np.float32)
    scores = np.array([[0.9, 0.0, 0.0], [0.0, 0.6, 0.0], [0.0, 0.8, 0.0]], np.float32)
    _, kinds, values = postprocess(boxes, scores, contract)
    assert sorted(zip(np.round(values.astype(float), 2).tolist(), kinds.tolist())) == [(0.8, 1), (0.9, 0)]


def test_voc_ap_by_hand_and_detection_metrics():
    # ranked: a false positive, then both true boxes; the envelope makes precision 2/3 at every recall
    assert voc_ap(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.5, 2 / 3])) == pytest.approx(2 / 3)
    truth = [Boxes(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([0, 0]))]
    found = [Detections(Boxes(np.array([[50, 50, 60, 60], [0, 0, 10, 9], [21, 21, 30, 30], [0, 0, 10, 10]], np.float32),
                              np.array([0, 0, 0, 0])), np.array([0.9, 0.8, 0.7, 0.6], np.float32))]
    metrics = detection_metrics(found, truth, operating=0.75)
    white = metrics["white_cell"]
    assert white["ap50"] == pytest.approx(2 / 3)  # the duplicate at 0.6 is a false positive, after full recall
    assert white["recall"] == pytest.approx(0.5) and white["precision"] == pytest.approx(0.5)
    assert metrics["red_cell"]["ap50"] is None and metrics["map50"] == pytest.approx(2 / 3)


def test_cells_boxed_another_way_are_found_at_iou_03():
    # a lymphocyte labelled by its nucleus and boxed far wider (IoU 0.25: not found even at 0.3); a cell found
    # tightly; a cell not found at all; a false box far away
    truth = [Boxes(np.array([[20, 20, 40, 40], [100, 100, 130, 130], [200, 200, 220, 220]], np.float32),
                   np.array([0, 0, 0]))]
    found = [Detections(Boxes(np.array([[10, 10, 50, 50], [100, 100, 130, 131], [300, 300, 320, 320]], np.float32),
                              np.array([0, 0, 0])), np.array([0.9, 0.8, 0.7], np.float32))]
    assert box_iou(found[0].boxes.xyxy[:1], truth[0].xyxy[:1])[0, 0] == pytest.approx(0.25)
    white = detection_metrics(found, truth, operating=0.3)["white_cell"]
    assert white["recall"] == pytest.approx(1 / 3) and white["recall_iou30"] == pytest.approx(1 / 3)
    wider = [Detections(Boxes(np.array([[15, 15, 45, 45], [100, 100, 130, 131]], np.float32), np.array([0, 0])),
                        np.array([0.9, 0.8], np.float32))]
    white = detection_metrics(wider, truth, operating=0.3)["white_cell"]
    assert white["recall"] == pytest.approx(1 / 3)  # VOC's 0.5 calls the wide box a miss (IoU 0.44)
    assert white["recall_iou30"] == pytest.approx(2 / 3)
    # the detector's threshold applies to the loose recall too
    assert detection_metrics(wider, truth, operating=0.85)["white_cell"]["recall_iou30"] == pytest.approx(1 / 3)


def test_voc_ap_agrees_with_sklearn_where_precision_only_falls():
    from sklearn.metrics import average_precision_score

    # every true box found, precision never rising: VOC's envelope changes nothing
    labels = np.array([1, 1, 1, 0, 1, 0, 0])
    scores = np.linspace(1, 0.1, len(labels))
    tp = np.cumsum(labels)
    ap = voc_ap(tp / labels.sum(), tp / np.arange(1, len(labels) + 1))
    assert ap == pytest.approx(average_precision_score(labels, scores))


# --- a trained run: export, training, resume ------------------------------------------------


def tiny_fields(root: Path, fields: int = 4) -> Path:
    """A YOLO field set of real Raabin fields (a few from each split), made small."""
    source = require(FIELDS)
    for split, count in (("train", fields), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for image in sorted((source / "images" / split).glob("*.jpg"))[:count]:
            Image.open(image).resize((192, 192)).save(root / "images" / split / image.name)
            shutil.copyfile(source / "labels" / split / f"{image.stem}.txt", root / "labels" / split / f"{image.stem}.txt")
    shutil.copyfile(source / "classes.txt", root / "classes.txt")
    return root


@pytest.mark.slow
def test_train_detector_writes_a_run_resumes_and_exports(tmp_path):
    from bloodcell.inference.detect import load_detector
    from bloodcell.training.detector import DetectorTrainConfig, train_detector

    data = tiny_fields(tmp_path / "fields")
    # a white cell's line read as a platelet (the red cells, the ruler's, left as labelled)
    label = min((data / "labels" / "train").glob("*.txt"))
    first = next(i for i, line in enumerate(label.read_text().splitlines(), 1) if line.startswith("0 "))
    fixes = tmp_path / "fixes.json"
    fixes.write_text(json.dumps([{"label_file": f"labels/train/{label.name}", "line": first,
                                  "reads": label.read_text().splitlines()[first - 1], "kind": "platelet"}]))
    config = DetectorTrainConfig(data=data, out=tmp_path / "run", detector=TINY, epochs=1, samples_per_epoch=4,
                                 batch_size=2, crop=96, max_pasted=0, warmup_steps=1, label_fixes=fixes)
    lines: list[str] = []
    run = train_detector(config, log=lines.append)
    assert f"label fixes: 1 fix of the train and val labels from {fixes}" in lines
    assert json.loads((run / "detector.json").read_text())["trained_on"]["label_fixes"] == str(fixes)
    for name in ("config.yaml", "detector.json", "metrics.csv", "best.safetensors", "last.safetensors", "detector.onnx"):
        assert (run / name).is_file(), name
    # the contract carries the training fields' red-cell ruler: from the YOLO labels of the (square) fields
    red = (data / "classes.txt").read_text().split().index("red_cell")
    sides = [max(float(w), float(h)) * TINY.image_size
             for label in (data / "labels" / "train").glob("*.txt")
             for kind, _, _, w, h in (line.split() for line in label.read_text().splitlines() if line.strip())
             if int(kind) == red]
    assert json.loads((run / "detector.json").read_text())["red_cell_side"] == pytest.approx(np.median(sides), abs=0.06)
    # resume: one more epoch, the first epoch's row kept
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("epochs: 1", "epochs: 2"))
    train_detector(resume=run, log=lines.append)
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert any("resuming" in line for line in lines)
    # ONNX and PyTorch find the same cells
    field = np.asarray(Image.open(next((data / "images" / "val").glob("*.jpg"))))
    onnx_found = load_detector(run, backend="onnx").detect(field)
    torch_found = load_detector(run, backend="torch").detect(field)
    assert len(onnx_found) == len(torch_found)
    if len(onnx_found):
        np.testing.assert_allclose(np.sort(onnx_found.scores), np.sort(torch_found.scores), atol=1e-3)


def test_more_field_sets_join_training_in_their_share(tmp_path):
    from bloodcell.training.detector import draw_fields, load_extra

    main, extra = [("raabin", i) for i in range(5)], [("other lab", i) for i in range(5)]
    rng = np.random.default_rng(0)
    samples = [draw_fields(rng, main, extra, 0.3, 4) for _ in range(2000)]
    assert all(len({lab for lab, _ in s}) == 1 for s in samples)  # one lab per sample
    assert np.mean([s[0][0] == "other lab" for s in samples]) == pytest.approx(0.3, abs=0.03)
    # without extra fields the draws are the ones before extra fields existed
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    assert draw_fields(a, main, [], 0.3, 4) == [main[i] for i in b.integers(len(main), size=4)]
    # a set with splits gives its train split; a set without, all of it
    with_splits = tiny_fields(tmp_path / "split")
    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    (flat / "labels").mkdir()
    (flat / "data.yaml").write_text("names: [WBC, RBC, Platelets]\n")
    for i in range(3):
        Image.new("RGB", (64, 64), (230, 200, 210)).save(flat / "images" / f"{i}.png")
        (flat / "labels" / f"{i}.txt").write_text("0 0.5 0.5 0.3 0.3\n")
    fields = load_extra([with_splits, flat])
    assert len(fields) == 4 + 3
    assert all(b.kinds.tolist() == [0] for _, b in fields[4:])


def test_a_detector_directory_without_a_contract_is_refused(tmp_path):
    from bloodcell.inference.detect import load_detector

    with pytest.raises(BloodcellError, match="not a bloodcell detector"):
        load_detector(tmp_path)
    with pytest.raises(BloodcellError, match="no such detector"):
        load_detector(tmp_path / "missing")


# --- the shipped detector, `bloodcell count` and /v1/count ------------------------------------


def shipped_detector():
    from bloodcell.inference.detect import load_detector

    try:
        return load_detector("default")
    except BloodcellError as exc:
        pytest.skip(str(exc))


def test_the_shipped_detector_finds_the_white_cells_of_another_labs_fields():
    from bloodcell.data.fields import load_field, open_fields, read_kinds

    detector = shipped_detector()
    root = require(FIELDS)
    kinds = read_kinds(root)
    fields = [load_field(item, kinds) for item in open_fields(root, "test")[:10]]
    found = [detector.detect(image) for image, _ in fields]
    metrics = detection_metrics(found, [b for _, b in fields], operating=detector.contract.operating())
    assert metrics["white_cell"]["recall"] >= 0.8
    assert metrics["red_cell"]["recall"] >= 0.6
    # boxes come back in the field's own pixels, at any size and aspect ratio
    image = fields[0][0]
    wide = np.asarray(Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0])))
    a, b = detector.detect(image), detector.detect(wide)
    white_a = a.boxes.xyxy[a.boxes.kinds == 0]
    white_b = b.boxes.xyxy[b.boxes.kinds == 0]
    assert len(white_a) and len(white_b)
    assert box_iou(white_a[:1] * np.array([2, 1, 2, 1], np.float32), white_b).max() > 0.7


def test_count_writes_cells_counts_summary_and_overlays(tmp_path):
    from bloodcell.inference.count import square_crop
    from bloodcell.workflows import count_fields

    shipped_detector()
    root = require(FIELDS)
    fields = tmp_path / "in" / "sub"
    fields.mkdir(parents=True)
    for image in sorted((root / "images" / "test").glob("*.jpg"))[:3]:
        shutil.copyfile(image, fields / image.name)
    blank = np.full((300, 400, 3), 235, np.uint8)  # an empty field: no cells at all
    Image.fromarray(blank).save(fields / "blank.png")
    (fields / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    other = tmp_path / "in" / "other"  # a second slide: one more field in its own folder
    other.mkdir()
    shutil.copyfile(min(fields.glob("*.jpg")), other / "again.jpg")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in fields.iterdir())
    out = tmp_path / "out"
    summary = count_fields([tmp_path / "in"], out, "default", "default")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in fields.iterdir()) == before  # the input is untouched
    cells = list(csv.DictReader((out / "cells.csv").read_text().splitlines()))
    assert list(cells[0])[:9] == ["image", "kind", "x0", "y0", "x1", "y1", "score", "class", "confidence"]
    assert {c["kind"] for c in cells} <= set(KINDS) and any(c["kind"] == "white_cell" for c in cells)
    for c in cells:
        assert (c["class"] != "") == (c["kind"] == "white_cell")
    counts = {Path(r["image"]).name: r for r in csv.DictReader((out / "counts.csv").read_text().splitlines())}
    assert set(counts) == {"blank.png", "again.jpg", *(p.name for p in fields.glob("*.jpg") if p.name != "broken.jpg")}
    assert counts["blank.png"]["white_cells"] == "0"
    assert counts["again.jpg"]["slide"] == "other" and counts["blank.png"]["slide"] == "sub"
    assert summary["differential"]["fields_without_white_cells"] >= 1
    assert [s["image"].endswith("broken.jpg") for s in summary["skipped"]] == [True]
    assert json.loads((out / "summary.json").read_text())["differential"]["fields"] == 5
    assert len(list((out / "overlays").glob("*.png"))) == 5
    # one row per slide, adding up to its fields' rows
    slides = {row["slide"]: row for row in csv.DictReader((out / "slides.csv").read_text().splitlines())}
    assert set(slides) == {"sub", "other"} and slides["sub"]["fields"] == "4" and slides["other"]["fields"] == "1"
    for name, row in slides.items():
        mine = [r for r in counts.values() if r["slide"] == name]
        for column in ("white_cells", "red_cells", "platelets", "to_check"):
            assert int(row["white_cell_boxes" if column == "white_cells" else column]) == sum(int(r[column]) for r in mine)
    assert [s["slide"] for s in summary["slides"]] == list(slides)
    # the report: each slide's differential and every white cell found as a thumbnail (fewer than 48 per class here)
    report = (out / "report.html").read_text()
    assert "Slide sub" in report and "Slide other" in report and "95% interval" in report
    assert report.count("<figure><img src='data:image/jpeg;base64,") == sum(c["kind"] == "white_cell" for c in cells)
    # the white-cell crop: centred on the box, padded with the field's colour at the edge
    image = np.zeros((100, 100, 3), np.uint8)
    image[:] = 200
    image[0:20, 0:20] = 10
    crop = square_crop(image, np.array([0, 0, 20, 20]), 2.0)
    assert crop.shape == (40, 40, 3) and (crop[10:30, 10:30] == 10).all() and (crop[:10] == 200).all()


@pytest.mark.browser
def test_count_on_the_page_and_the_api(tmp_path):
    from fastapi.testclient import TestClient

    from bloodcell.service.app import create_app

    from .browser import open_page
    from .test_predict_serve import serving

    shipped_detector()
    root = require(FIELDS)
    field = min((root / "images" / "test").glob("*.jpg"))
    app = create_app("default")
    client = TestClient(app)
    assert client.get("/v1/model").json()["count"] is True
    response = client.post("/v1/count", files=[("files", (field.name, field.read_bytes(), "image/jpeg")),
                                               ("files", ("bad.png", b"nope", "image/png"))])
    assert response.status_code == 200
    body = response.json()
    assert body["errors"][0]["file"] == "bad.png"
    result = body["results"][0]
    assert result["counts"]["white_cells"] == sum(c["kind"] == "white_cell" for c in result["cells"])
    assert body["summary"]["fields"] == 1
    assert client.post("/v1/count", files=[("files", ("bad.png", b"nope", "image/png"))]).status_code == 422
    with serving(app) as url, open_page(url) as (page, errors):
        page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
        page.set_input_files("#fieldfiles", [str(field)])
        page.wait_for_selector(".field svg rect.white_cell", timeout=30000)
        assert page.locator(".field svg rect.red_cell").count() > 3
        assert "% of white cells" in page.inner_text("#fieldsummary") and "95% interval" in page.inner_text("#fieldsummary")
        counted = sum(c["kind"] == "white_cell" and not c["to_check"] for c in result["cells"])
        if counted:  # each type's exact 95% interval over the white cells counted so far
            assert page.evaluate(f"intervalText(0, {counted})") in page.inner_text("#fieldsummary")
        with page.expect_download() as download_info:
            page.click("#fieldcsv")
        download_info.value.save_as(tmp_path / "cells.csv")
        lines = (tmp_path / "cells.csv").read_text().splitlines()
        assert lines[0].startswith("image,kind,x0,y0,x1,y1,score,class,confidence")
        assert len(lines) == 1 + len(result["cells"])
        assert not errors


def test_the_commands_explain_what_is_wrong_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from bloodcell.cli import app

    runner = CliRunner()
    shipped_detector()
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    result = runner.invoke(app, ["count", str(tmp_path / "broken.jpg"), str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no field could be read" in result.output and "Traceback" not in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["count", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "no field image found in" in result.output and not (tmp_path / "o2").exists()
    result = runner.invoke(app, ["count", str(tmp_path), "--out", str(tmp_path / "o"), "--detector", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no such detector directory" in result.output
    monkeypatch.delenv("BLOODCELL_DATA", raising=False)
    result = runner.invoke(app, ["train-detector", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no fields given" in result.output
    (tmp_path / "plain").mkdir()
    result = runner.invoke(app, ["train-detector", "--data", str(tmp_path / "plain"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "not a field set (no classes.txt" in result.output


def test_count_command_prints_the_differential(tmp_path):
    from typer.testing import CliRunner

    from bloodcell.cli import app

    shipped_detector()
    field = min((require(FIELDS) / "images" / "test").glob("*.jpg"))
    result = CliRunner().invoke(app, ["count", str(field), "--out", str(tmp_path / "o"), "--no-overlays"])
    assert result.exit_code == 0, result.output
    assert "white cell type" in result.output and "red cells" in result.output and "95% interval" in result.output
    assert (tmp_path / "o" / "cells.csv").is_file() and not (tmp_path / "o" / "overlays").exists()


def test_count_cuts_the_white_cells_out_for_review_and_adapt_reads_them(tmp_path):
    """`count --crops`: each white cell in its class's folder (or to_check/), named in cells.csv; once the
    lab has sorted them, adapt reads the folder as labelled cells and leaves the unsorted ones out."""
    from typer.testing import CliRunner

    from bloodcell.cli import app
    from bloodcell.core.classes import CLASS_NAMES
    from bloodcell.inference.count import CROP_CONTEXT
    from bloodcell.workflows.adapt import load_labelled

    shipped_detector()
    fields = sorted((require(FIELDS) / "images" / "test").glob("*.jpg"))[:4]
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["count", *map(str, fields), "--out", str(out), "--no-overlays", "--crops"])
    assert result.exit_code == 0, result.output
    assert "bloodcell adapt --data" in " ".join(result.output.split())
    cells = list(csv.DictReader((out / "cells.csv").read_text().splitlines()))
    white = [c for c in cells if c["kind"] == "white_cell"]
    assert white and all(c["crop"] == "" for c in cells if c["kind"] != "white_cell")
    files = sorted((out / "crops").rglob("*.png"))
    assert sorted(str(f.relative_to(out)) for f in files) == sorted(c["crop"] for c in white)
    for c in white:
        folder = Path(c["crop"]).parent.name
        assert folder == ("to_check" if c["to_check"] == "True" else c["class"])
        side = Image.open(out / c["crop"]).size
        box_side = max(float(c["x1"]) - float(c["x0"]), float(c["y1"]) - float(c["y0"]))
        assert side[0] == side[1] and abs(side[0] - box_side * CROP_CONTEXT) <= 2
    # The lab sorts every cell to check but one into a class folder: adapt learns from the sorted cells and
    # says what it left out.
    to_check = out / "crops" / "to_check"
    to_check.mkdir(exist_ok=True)
    if not any(to_check.iterdir()):
        files[0].rename(to_check / "unsorted.png")
    (out / "crops" / "lymphocyte").mkdir(exist_ok=True)
    for file in sorted(to_check.iterdir())[1:]:
        file.rename(out / "crops" / "lymphocyte" / file.name)
    lines = []
    cells = load_labelled(out / "crops", list(CLASS_NAMES), 32, None, lines.append)
    labels, counts = cells.labels, cells.counts
    assert len(labels) == len(white) - 1 >= 1 and sum(counts.values()) == len(labels)
    assert "to_check/: 1 cell(s) not sorted into a class folder, left out" in lines


def test_nested_boxes_of_one_white_cell_count_once_and_thresholds_can_differ_by_kind():
    from bloodcell.inference.detect import nested_suppression

    # a whole cell, a lobe inside it, and a looser box round it: one cell; a neighbour stays
    boxes = np.array([[10, 10, 50, 50], [20, 20, 35, 35], [0, 0, 60, 60], [100, 100, 140, 140]], np.float32)
    scores = np.array([0.9, 0.5, 0.4, 0.8], np.float32)
    assert sorted(nested_suppression(boxes, scores, 0.7).tolist()) == [0, 3]
    contract = DetectorContract(score_threshold=0.1, kind_thresholds={"white_cell": 0.6}, nested={"white_cell": 0.7})
    score_rows = np.zeros((4, 3), np.float32)
    score_rows[:, 0] = scores
    score_rows[3] = [0.0, 0.5, 0.0]  # a red cell at 0.5: above its kind's threshold
    _, kinds, values = postprocess(boxes, score_rows, contract)
    assert kinds.tolist() == [0, 1] and values.tolist() == pytest.approx([0.9, 0.5])
    assert contract.operating() == {"white_cell": 0.6, "red_cell": 0.1, "platelet": 0.1}


def test_blank_training_samples_have_no_boxes():
    rng = np.random.default_rng(4)
    field = (np.full((100, 120, 3), 210, np.uint8), Boxes(np.array([[10, 10, 40, 40]], np.float32), np.array([0])))
    image, boxes = training_sample([field], 128, 96, rng, blank_p=1.0)
    assert image.shape == (96, 96, 3) and len(boxes) == 0
    assert image.std() < 40  # background with light and noise, no structure


def test_detector_config_refuses_an_unknown_kind_in_min_visible_by_kind():
    from pydantic import ValidationError

    from bloodcell.training.detector import DetectorTrainConfig

    assert DetectorTrainConfig(min_visible_by_kind={"white_cell": 0.1}).min_visible_by_kind == {"white_cell": 0.1}
    with pytest.raises(ValidationError, match="unknown kind neutrophil"):
        DetectorTrainConfig(min_visible_by_kind={"neutrophil": 0.1})
    with pytest.raises(ValidationError, match="between 0 and 1"):
        DetectorTrainConfig(min_visible_by_kind={"platelet": 1.5})


# --- fields at a lower magnification than the training fields --------------------------------


def painted_network(min_side: float):
    """A stand-in for the detector network: it "finds" the painted squares of a letterboxed canvas (red:
    red cell, blue: white cell) as exactly as FCOS outputs would carry them, but only those at least
    ``min_side`` pixels across in the canvas, as a detector misses cells much smaller than it was trained on."""
    from scipy import ndimage

    def run(canvases: np.ndarray):
        boxes, scores = [], []
        for canvas in canvases.transpose(0, 2, 3, 1):
            rows_b, rows_s = [], []
            for kind, channel in ((1, 0), (0, 2)):  # (kind index, the channel that paints it)
                mask = (canvas[..., channel] > 200) & (canvas.sum(axis=2) < 400)
                for sl in ndimage.find_objects(ndimage.label(mask)[0]):
                    y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
                    if max(x1 - x0, y1 - y0) >= min_side:
                        rows_b.append([x0, y0, x1, y1])
                        rows_s.append([0.9 if k == kind else 0.01 for k in range(3)])
            rows_b += [[0, 0, 1, 1]] * (256 - len(rows_b))
            rows_s += [[0.0, 0.0, 0.0]] * (256 - len(rows_s))
            boxes.append(rows_b[:256])
            scores.append(rows_s[:256])
        return np.asarray(boxes, np.float32), np.asarray(scores, np.float32)

    return run


def ndimage_count(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask)[1])


def painted_field(side: int, red: int, rng, spacing: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A grey field with a grid of red squares ``red`` px across, ``spacing`` times that apart (2: a quarter
    of the field is red), and one blue square twice that (the white cell)."""
    image = np.full((side, side, 3), 120, np.uint8)
    step, offset = round(spacing * red), int(rng.integers(0, red))
    x, y = (int(v) for v in rng.integers(0, side - 2 * red, 2))
    for top in range(offset, side - red, step):
        for left in range(offset, side - red, step):
            if box_iou(np.array([[left, top, left + red, top + red]], np.float32),
                       np.array([[x - 2, y - 2, x + 2 * red + 2, y + 2 * red + 2]], np.float32))[0, 0] == 0:
                image[top : top + red, left : left + red] = (230, 40, 40)
    image[y : y + 2 * red, x : x + 2 * red] = (40, 40, 230)
    return image, np.array([x, y, x + 2 * red, y + 2 * red], np.float32)


def test_a_field_at_lower_magnification_is_read_again_on_magnified_tiles():
    from bloodcell.inference.detect import CellDetector

    rng = np.random.default_rng(0)
    contract = DetectorContract(image_size=128, red_cell_side=20.0, magnify_below=0.7)
    detector = CellDetector(painted_network(min_side=12), contract)
    plain = CellDetector(painted_network(min_side=12), contract.model_copy(update={"red_cell_side": None}))
    # the training magnification: red cells 20 px in the 128 px letterbox (a 512 px field, red cells 80 px)
    image, white = painted_field(512, 80, rng)
    assert detector.ruler(detector.detect(image), 512) == pytest.approx(20.0, abs=1.0)
    # a third of it: red cells 7 px in the letterbox, too small for the network; the white cell 13 px
    for _ in range(6):  # the cells fall on tiles' edges in some of these
        image, white = painted_field(768, 40, rng)
        seen = plain.detect(image)
        assert not (seen.boxes.kinds == KINDS.index("red_cell")).any()
        found = detector.detect(image)
        red = found.boxes.xyxy[found.boxes.kinds == KINDS.index("red_cell")]
        painted = ndimage_count(image[..., 0] > 200)
        assert len(red) == painted  # every red cell once: none lost or doubled where tiles overlap
        assert np.allclose(red[:, 2] - red[:, 0], 40, atol=2.5)  # in the field's own pixels (a letterbox pixel is ~2 of them)
        whites = found.boxes.xyxy[found.boxes.kinds == KINDS.index("white_cell")]
        assert len(whites) == 1 and box_iou(whites, white[None])[0, 0] > 0.95
    # a field with no red cells at all keeps its one reading
    blank = np.full((300, 300, 3), 120, np.uint8)
    assert len(detector.detect(blank)) == 0
    # so does an image too small to cut into tiles worth reading (under 64 px across)
    small, _ = painted_field(96, 8, rng)
    assert np.array_equal(detector.detect(small).boxes.xyxy, plain.detect(small).boxes.xyxy)


def test_a_crowded_field_is_magnified_only_at_a_lower_magnification():
    from bloodcell.inference.detect import CellDetector

    rng = np.random.default_rng(1)
    contract = DetectorContract(image_size=128, red_cell_side=20.0, magnify_below=0.7, crowded_cover=0.4,
                                crowded_magnify_below=0.45)
    detector = CellDetector(painted_network(min_side=6), contract)
    # red cells at 0.55 of the training size: 11 px in the 128 px letterbox of a 512 px field
    sparse, _ = painted_field(512, 44, rng)
    crowded, _ = painted_field(512, 44, rng, spacing=1.2)
    assert detector.red_cover(detector._letterboxed([sparse])[0], sparse.shape) < 0.4
    assert detector.red_cover(detector._letterboxed([crowded])[0], crowded.shape) > 0.4
    assert detector.detect(sparse).magnification > 1  # sparse: magnified below 0.7, as before
    assert detector.detect(crowded).magnification == 1  # crowded: read as it is down to 0.45
    # at 0.35 of the training size a crowded field is magnified too
    crowded, white = painted_field(512, 28, rng, spacing=1.2)
    found = detector.detect(crowded)
    assert found.magnification > 1
    whites = found.boxes.xyxy[found.boxes.kinds == KINDS.index("white_cell")]
    assert len(whites) == 1 and box_iou(whites, white[None])[0, 0] > 0.9


def test_the_shipped_detector_reads_crowded_fields_at_a_lower_magnification_without_tiles():
    """A window of four of its lab's test fields side by side, at 0.55 of the magnification (crowded with red
    cells, as a lower-power objective shows a smear), is read as it is, its white cells found as well as on tiles."""
    from bloodcell.data.fields import load_field, open_fields, read_kinds

    detector = shipped_detector()
    before = type(detector)(detector._run, detector.contract.model_copy(update={"crowded_cover": 1.0}))
    root = require(FIELDS)
    kinds = read_kinds(root)
    fields = [load_field(item, kinds) for item in open_fields(root, "test")[:12]]
    white = KINDS.index("white_cell")
    hits, tiled_hits, total = 0, 0, 0
    for start in range(0, 12, 4):
        chosen = fields[start : start + 4]
        h, w = min(i.shape[0] for i, _ in chosen), min(i.shape[1] for i, _ in chosen)
        mosaic = np.zeros((2 * h, 2 * w, 3), np.uint8)
        truth = []
        for k, (image, boxes) in enumerate(chosen):
            top, left = (k // 2) * h, (k % 2) * w
            mosaic[top : top + h, left : left + w] = image[:h, :w]
            truth.append(boxes.xyxy[boxes.kinds == white] + np.array([left, top, left, top], np.float32))
        side = round(w / 0.55)
        x0, y0 = (2 * w - side) // 2, (2 * h - side) // 2
        window = mosaic[y0 : y0 + side, x0 : x0 + side]
        truth = np.concatenate(truth) - np.array([x0, y0, x0, y0], np.float32)
        truth = truth[(truth[:, 0] >= 0) & (truth[:, 1] >= 0) & (truth[:, 2] <= side) & (truth[:, 3] <= side)]
        found, tiled = detector.detect(window), before.detect(window)
        assert found.magnification == 1 and tiled.magnification > 1
        for reading, add in ((found, "plain"), (tiled, "tiled")):
            mine = reading.boxes.xyxy[reading.boxes.kinds == white]
            matched = int((box_iou(truth, mine) >= 0.5).any(axis=1).sum()) if len(mine) and len(truth) else 0
            hits, tiled_hits = (hits + matched, tiled_hits) if add == "plain" else (hits, tiled_hits + matched)
        total += len(truth)
    assert total >= 6 and hits >= tiled_hits - 1 and hits >= 0.8 * total


def test_the_shipped_detector_reads_its_fields_at_a_third_of_their_magnification():
    from bloodcell.data.fields import fill_colour, load_field, open_fields, read_kinds

    detector = shipped_detector()
    assert detector.contract.red_cell_side is not None
    plain = type(detector)(detector._run, detector.contract.model_copy(update={"red_cell_side": None}))
    root = require(FIELDS)
    kinds = read_kinds(root)
    white = KINDS.index("white_cell")
    hits, plain_hits, fields = 0, 0, 0
    for item in open_fields(root, "test")[:12]:
        image, boxes = load_field(item, kinds)
        height, width = image.shape[:2]
        small = np.asarray(Image.fromarray(image).resize((width // 3, height // 3), Image.Resampling.BILINEAR))
        canvas = np.empty_like(image)
        canvas[:] = fill_colour(image)
        canvas[: small.shape[0], : small.shape[1]] = small
        truth = boxes.xyxy[boxes.kinds == white] / 3
        for found, counter in ((detector.detect(canvas), "hits"), (plain.detect(canvas), "plain")):
            mine = found.boxes.xyxy[found.boxes.kinds == white]
            matched = int((box_iou(truth, mine) >= 0.5).any(axis=1).sum()) if len(mine) and len(truth) else 0
            if counter == "hits":
                hits += matched
            else:
                plain_hits += matched
        fields += len(truth)
    assert hits >= 0.8 * fields > plain_hits + 0.3 * fields  # found at a third; mostly missed without the ruler


def test_count_says_which_fields_it_read_magnified(tmp_path):
    """A field at a third of the training magnification is listed with its magnification; one at it is not."""
    from bloodcell.data.fields import fill_colour
    from bloodcell.workflows import count_fields

    shipped_detector()
    root = require(FIELDS)
    source = sorted((root / "images" / "test").glob("*.jpg"))[0]
    image = np.asarray(Image.open(source).convert("RGB"))
    height, width = image.shape[:2]
    canvas = np.empty_like(image)
    canvas[:] = fill_colour(image)
    small = np.asarray(Image.fromarray(image).resize((width // 3, height // 3), Image.Resampling.BILINEAR))
    canvas[: small.shape[0], : small.shape[1]] = small
    fields = tmp_path / "in"
    fields.mkdir()
    shutil.copyfile(source, fields / "as_taken.jpg")
    Image.fromarray(canvas).save(fields / "a_third.png")
    summary = count_fields([fields], tmp_path / "out", "default", "default", overlays=False)
    assert [m["image"].endswith("a_third.png") for m in summary["magnified"]] == [True]
    assert 2 <= summary["magnified"][0]["magnification"] <= 6
    assert summary["differential"]["fields_magnified"] == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["magnified"] == summary["magnified"]


def test_a_white_cell_box_without_stained_pixels_is_dropped():
    """Another lab's pale red cells read as white cells hold no nucleus; the box is dropped, a stained one kept."""
    from bloodcell.data.fields import Letterbox
    from bloodcell.inference.detect import CellDetector

    canvas = np.zeros((128, 128, 3), np.uint8)
    canvas[:] = (235, 215, 210)  # background
    yy, xx = np.mgrid[0:128, 0:128]
    canvas[(yy - 40) ** 2 + (xx - 40) ** 2 < 15**2] = (215, 170, 190)  # a pale red cell
    canvas[(yy - 90) ** 2 + (xx - 90) ** 2 < 12**2] = (90, 40, 130)  # a purple nucleus
    frame = Letterbox(scale=0.5, left=0, top=0)  # the field is twice the canvas
    boxes = Boxes(np.array([[50, 50, 110, 110], [150, 150, 210, 210], [50, 50, 110, 110]], np.float32),
                  np.array([KINDS.index("white_cell"), KINDS.index("white_cell"), KINDS.index("red_cell")]))
    found = Detections(boxes, np.array([0.9, 0.8, 0.7], np.float32))
    kept = CellDetector(None, DetectorContract(white_cell_min_stain=0.05)).nucleated(found, canvas, frame)
    assert kept.boxes.kinds.tolist() == [KINDS.index("white_cell"), KINDS.index("red_cell")]
    np.testing.assert_allclose(kept.boxes.xyxy[0], [150, 150, 210, 210])  # the nucleated one
    off = CellDetector(None, DetectorContract(white_cell_min_stain=0.0))
    assert len(off.nucleated(found, canvas, frame)) == 3  # 0: every box kept
    assert json.loads((Path(__file__).parents[1] / "src/bloodcell/default_detector/detector.json").read_text())[
        "white_cell_min_stain"] == 0.05


def test_pasted_platelets_take_the_fields_scale_or_their_own_size():
    """Pasted platelets are 0.2-0.45 of the field's red cells, or, with own_size_p, their own size against their
    PBC image's red cells (a giant platelet stays as large as a red cell); they land where no cell is."""
    from bloodcell.data.fields import PASTED_SIDE, PastePatch, paste_platelets

    red = np.array([[0, 0, 100, 100], [200, 0, 300, 100], [0, 200, 100, 300]], np.float32)
    field = np.full((600, 600, 3), 220, np.uint8)
    giant = PastePatch(np.full((20, 20, 3), (120, 60, 160), np.uint8), np.ones((20, 20), np.float32), (2, 2, 18, 18), 0.9)
    for own, low, high in ((0.0, *PASTED_SIDE), (1.0, 0.9 * 0.9, 0.9 * 1.1)):
        image, boxes = paste_platelets(field, Boxes(red, np.full(3, KINDS.index("red_cell"))), [giant], 12,
                                       np.random.default_rng(0), own_size_p=own)
        pasted = boxes.xyxy[boxes.kinds == KINDS.index("platelet")]
        assert len(pasted) >= 8
        sides = np.maximum(pasted[:, 2] - pasted[:, 0], pasted[:, 3] - pasted[:, 1]) / 100
        assert sides.min() >= low - 0.02 and sides.max() <= high + 0.02, (own, sides)
        assert box_iou(pasted, red).max() < 0.05 and (image != field).any()
