import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    recall_score,
)
from typer.testing import CliRunner

from bloodcell.cli.main import app as cli
from bloodcell.data.corruptions import CORRUPTIONS, corrupt
from bloodcell.evaluation import (
    compute_metrics,
    expected_calibration_error,
    fit_temperature,
)

from .conftest import ORIGINALS, require, whole_fields


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 500)
    logits = rng.normal(size=(500, 4)) + 2.0 * np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    m = compute_metrics(labels, probs, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    recalls = recall_score(labels, pred, average=None)
    assert [m["per_class"][c]["recall"] for c in "abcd"] == pytest.approx(recalls)


def test_confusion_and_per_class_on_a_hand_made_case():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 1, 0])
    probs = np.eye(3)[pred] * 0.7 + 0.1
    m = compute_metrics(labels, probs, ["x", "y", "z"])
    assert m["confusion_matrix"]["matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["x"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["y"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["z"]["recall"] == 0 and m["per_class"]["z"]["support"] == 1
    assert m["accuracy"] == pytest.approx(4 / 6)
    # top-2: the true class is second for the two mistakes? Here all other classes tie at 0.1.
    assert m["top2_accuracy"] >= m["accuracy"]
    assert m["mean_confidence"] == pytest.approx(0.8)  # every answer's top probability is 0.7 + 0.1


def test_temperature_lowers_the_ece_of_an_overconfident_model():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 8, 4000)
    logits = rng.normal(size=(4000, 8)) + 1.5 * np.eye(8)[labels]
    logits = torch.tensor(logits * 4.0, dtype=torch.float32)  # far too sure of itself
    targets = torch.tensor(labels)
    before = expected_calibration_error(torch.softmax(logits, 1).numpy(), labels)
    t = fit_temperature(logits, targets)
    after = expected_calibration_error(torch.softmax(logits / t, 1).numpy(), labels)
    assert t > 2
    assert after < before / 3


@pytest.mark.parametrize("family", sorted(CORRUPTIONS))
def test_corruptions_are_deterministic_and_change_the_image(family):
    from PIL import Image

    image = np.asarray(Image.open(sorted(require(ORIGINALS).glob("*/*.jpg"))[0]).convert("RGB"))
    a = corrupt(image, family, 3, seed=5)
    b = corrupt(image, family, 3, seed=5)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - image).mean() > 0.5
    # Higher severity moves the image further.
    mild = np.abs(corrupt(image, family, 1, seed=5).astype(int) - image).mean()
    strong = np.abs(corrupt(image, family, 5, seed=5).astype(int) - image).mean()
    assert strong > mild


@pytest.mark.slow
def test_evaluate_a_trained_run_end_to_end(tmp_path):
    import json

    from bloodcell.evaluation import evaluate_model
    from bloodcell.training import TrainConfig, train

    from .test_train import make_tiny_data

    data = make_tiny_data(tmp_path / "data")
    config = TrainConfig(data=data, out=tmp_path / "run", model="cnn", image_size=32, batch_size=32,
                         phases=[{"name": "t", "epochs": 2, "lr": 3e-3}], cnn={"channels": [16, 32], "convs_per_block": 1})
    train(config, log=lambda line: None)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    # Temperature scaling minimises the validation NLL (the ECE on 80 images is too noisy to test).
    assert meta["temperature"] > 0 and meta["val_nll_after"] <= meta["val_nll_before"] + 1e-6
    out = tmp_path / "eval"
    result = evaluate_model(tmp_path / "run", data / "val.npz", out, corruptions=True,
                            families=["defocus_blur", "reframe"])
    written = json.loads((out / "metrics.json").read_text())
    assert list(written)[:5] == ["accuracy", "balanced_accuracy", "macro_f1", "top2_accuracy", "ece"]
    assert set(written["corruptions"]["accuracy"]) == {"defocus_blur", "reframe"}
    assert set(written["corruptions"]["accuracy"]["reframe"]) == {"1", "2", "3", "4", "5"}
    for name in ("predictions.csv", "confusion_matrix.png", "reliability.png", "corruptions.png"):
        assert (out / name).is_file(), name
    header = (out / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["path", "label", "pred", "confidence"] and len(header) == 4 + 8
    assert result["count"] == 80
    # The validation split set the out-of-distribution threshold at its 99th percentile: not flagged.
    shift = written["domain_shift"]
    assert shift["images"] == 80 and shift["flagged"] is False and shift["images_flagged"] <= 1
    # The same figures from the exported ONNX model, and test-time augmentation runs.
    from bloodcell.inference.export import export_onnx

    export_onnx(tmp_path / "run", tmp_path / "model.onnx")
    onnx_result = evaluate_model(tmp_path / "model.onnx", data / "val.npz", tmp_path / "eval-onnx")
    assert onnx_result["accuracy"] == pytest.approx(result["accuracy"], abs=1 / 80)
    assert onnx_result["domain_shift"]["score"] == pytest.approx(shift["score"], rel=1e-3)
    tta = evaluate_model(tmp_path / "run", data / "val.npz", tmp_path / "eval-tta", tta=True)
    assert tta["tta"] is True and 0 <= tta["accuracy"] <= 1


@pytest.mark.slow
def test_a_dataset_with_a_subset_of_classes_is_scored_on_those(tmp_path, original_files):
    """Another lab's white cells only: scored on the classes present, unknown classes refused."""
    from bloodcell.data import BloodcellError
    from bloodcell.evaluation import evaluate_model
    from bloodcell.training import TrainConfig, train

    from .test_train import make_tiny_data

    data = make_tiny_data(tmp_path / "data")
    train(TrainConfig(data=data, out=tmp_path / "run", model="cnn", image_size=32, batch_size=32,
                      phases=[{"name": "t", "epochs": 1, "lr": 3e-3}], cnn={"channels": [8], "convs_per_block": 1}),
          log=lambda line: None)
    other_lab = tmp_path / "other_lab"
    for f in original_files:
        if f.parent.name in ("lymphocyte", "monocyte", "neutrophil"):
            (other_lab / f.parent.name).mkdir(parents=True, exist_ok=True)
            (other_lab / f.parent.name / f.name).write_bytes(f.read_bytes())
    result = evaluate_model(tmp_path / "run", other_lab, tmp_path / "eval")
    assert result["classes_present"] == ["lymphocyte", "monocyte", "neutrophil"]
    assert result["per_class"]["basophil"]["support"] == 0
    # the same cells in folders a lab names its own way are read as the model's classes, and said so
    renamed = tmp_path / "renamed_lab"
    for folder, name in (("Lymphocytes", "lymphocyte"), ("MONO", "monocyte"), ("neutrophils", "neutrophil")):
        shutil.copytree(other_lab / name, renamed / folder)
    again = evaluate_model(tmp_path / "run", renamed, tmp_path / "eval_renamed")
    assert again["class_folders"] == {"Lymphocytes": "lymphocyte", "MONO": "monocyte", "neutrophils": "neutrophil"}
    assert again["classes_present"] == result["classes_present"] and again["accuracy"] == result["accuracy"]
    assert "class_folders" not in result
    (other_lab / "blast").mkdir()
    (other_lab / "blast" / "x.jpg").write_bytes(original_files[0].read_bytes())
    with pytest.raises(BloodcellError, match="unknown class folder.*blast"):
        evaluate_model(tmp_path / "run", other_lab, tmp_path / "eval2")
    # left out on request: the same figures on the classes it knows, the folder named with its files
    skipped = evaluate_model(tmp_path / "run", other_lab, tmp_path / "eval3", skip_unknown=True)
    assert skipped["left_out"] == {"blast": 1} and skipped["accuracy"] == result["accuracy"]
    assert skipped["count"] == result["count"]
    cli_result = CliRunner().invoke(cli, ["evaluate", "--model", str(tmp_path / "run"), "--data", str(other_lab),
                                          "--out", str(tmp_path / "eval4"), "--skip-unknown"])
    assert cli_result.exit_code == 0, cli_result.output
    assert "blast/: 1 image(s) of a class the model does not know, left out" in cli_result.output
    assert skipped["unreadable"] == []
    # a file that is no image is left out, named with the reason (metrics.json and the command), never dropped silently
    broken = other_lab / "neutrophil" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a JPEG")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # answers naming classes the set lacks are no warning to the user
        with_broken = evaluate_model(tmp_path / "run", other_lab, tmp_path / "eval5", skip_unknown=True)
    assert with_broken["count"] == result["count"] and with_broken["accuracy"] == result["accuracy"]
    assert [bad["path"] for bad in with_broken["unreadable"]] == [str(broken)]
    assert "not an image" in with_broken["unreadable"][0]["error"]
    assert json.loads((tmp_path / "eval5" / "metrics.json").read_text())["unreadable"] == with_broken["unreadable"]
    cli_result = CliRunner().invoke(cli, ["evaluate", "--model", str(tmp_path / "run"), "--data", str(other_lab),
                                          "--out", str(tmp_path / "eval6"), "--skip-unknown"])
    assert cli_result.exit_code == 0, cli_result.output
    flat = "".join(cli_result.output.split())  # rich wraps long paths anywhere
    assert f"skipped{broken}:notanimage" in flat


def test_temperature_stays_finite_on_a_model_that_learnt_nothing():
    """Near-uniform logits (a barely trained model) once sent L-BFGS to NaN; the fit must stay in bounds."""
    torch.manual_seed(0)
    labels = torch.randint(0, 8, (80,))
    for logits in (torch.randn(80, 8) * 0.01, torch.zeros(80, 8), torch.randn(80, 8) * 50):
        t = fit_temperature(logits, labels)
        assert np.isfinite(t) and 0.05 <= t <= 20.0


def test_evaluate_fields_finds_the_white_cell_of_each_labelled_field(tmp_path, original_files, monkeypatch):
    """Whole fields, one white cell each, labelled by folder: --fields finds the cell with the detector and
    classifies it as `count` does, where plain evaluation frames the whole field."""
    import csv

    from bloodcell.core.errors import BloodcellError
    from bloodcell.evaluation import evaluate_model
    from bloodcell.inference.count import count_field_like, mostly_fields
    from bloodcell.inference.detect import load_detector

    try:
        load_detector("default")
    except BloodcellError as exc:
        pytest.skip(str(exc))
    fields = whole_fields(tmp_path / "fields", {cls: [f for f in original_files if f.parent.name == cls][:4]
                                                for cls in ("eosinophil", "lymphocyte", "neutrophil")})
    (fields / "neutrophil" / "broken.png").write_bytes(b"not a PNG")
    before = sorted((p.relative_to(fields), p.stat().st_mtime_ns) for p in fields.rglob("*"))
    plain = evaluate_model("default", fields, tmp_path / "plain", fields=False, check_fields=True)
    found = evaluate_model("default", fields, tmp_path / "found", fields=True)
    # by default evaluate looks first, and reads whole fields as fields: the same answers as --fields,
    # with one detector session for the look and the reading
    from bloodcell.inference import predictor as predictor_module

    opened: list[str] = []
    real_session = predictor_module.onnx_session
    monkeypatch.setattr(predictor_module, "onnx_session",
                        lambda path, *args, **kwargs: opened.append(Path(path).name) or real_session(path, *args, **kwargs))
    auto = evaluate_model("default", fields, tmp_path / "auto")
    monkeypatch.undo()
    assert opened.count("detector.onnx") == 1, opened
    assert auto["read_as"] == "fields" and plain["read_as"] == "cells" and found["read_as"] == "fields"
    assert auto["accuracy"] == found["accuracy"] and auto["fields"]["white_cell_found"] == found["fields"]["white_cell_found"]
    assert mostly_fields((auto["field_like"]["whole_fields"], auto["field_like"]["images_looked_at"]))
    cli_result = CliRunner().invoke(cli, ["evaluate", "--model", "default", "--data", str(fields), "--out", str(tmp_path / "cli")])
    assert cli_result.exit_code == 0, cli_result.output
    assert "each was read as `bloodcell count` reads it" in " ".join(cli_result.output.split())
    cli_plain = CliRunner().invoke(cli, ["evaluate", "--model", "default", "--data", str(fields), "--out",
                                         str(tmp_path / "cli-plain"), "--no-fields"])
    assert cli_plain.exit_code == 0 and "`--fields` finds the white cell first" in " ".join(cli_plain.output.split())
    assert json.loads((tmp_path / "cli-plain" / "metrics.json").read_text())["accuracy"] == plain["accuracy"]
    assert sorted((p.relative_to(fields), p.stat().st_mtime_ns) for p in fields.rglob("*")) == before
    # plain evaluation says what it saw: whole fields, which --fields reads

    assert mostly_fields((plain["field_like"]["whole_fields"], plain["field_like"]["images_looked_at"]))
    assert not mostly_fields(count_field_like([str(f) for f in original_files]))  # PBC's own crops are not fields
    assert "field_like" not in found
    assert found["count"] == 12 and found["fields"]["images"] == 12
    assert found["fields"]["white_cell_found"] >= 10
    assert [u["path"].endswith("broken.png") for u in found["fields"]["unreadable"]] == [True]
    assert found["accuracy"] >= 0.75 and found["accuracy"] >= plain["accuracy"] + 0.25
    rows = list(csv.DictReader((tmp_path / "found" / "predictions.csv").read_text().splitlines()))
    assert list(rows[0])[-5:] == ["x0", "y0", "x1", "y1", "box_score"]
    boxed = [r for r in rows if r["x0"]]
    assert len(boxed) == found["fields"]["white_cell_found"]
    assert all(0 <= float(r["x0"]) < float(r["x1"]) <= 640 and 0 <= float(r["y0"]) < float(r["y1"]) <= 480 for r in boxed)
    with pytest.raises(BloodcellError, match="--corruptions"):
        evaluate_model("default", fields, tmp_path / "both", fields=True, corruptions=True)
