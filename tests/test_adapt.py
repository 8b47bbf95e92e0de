"""`bloodcell adapt`: a model adapted to a lab's labelled or unlabelled cells is a model like any other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bloodcell.cli.main import app as cli
from bloodcell.core.classes import CLASS_NAMES
from bloodcell.core.errors import BloodcellError
from bloodcell.inference import load_predictor
from bloodcell.training import TrainConfig, train
from bloodcell.training.adapt import AdaptConfig, finetune
from bloodcell.workflows import adapt_model
from bloodcell.workflows.adapt import load_labelled

from .conftest import PBC224, require
from .test_train import make_tiny_data

LAB_CLASSES = ("eosinophil", "lymphocyte", "neutrophil")


def other_lab(image: np.ndarray) -> np.ndarray:
    """Another lab's look: a yellow lamp (less blue) and a paler stain."""
    out = image.astype(np.float32) * np.array([1.0, 0.97, 0.7]) * 0.85 + 30
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    data = make_tiny_data(root / "data")
    config = TrainConfig(data=data, out=root / "run", model="cnn", image_size=32, batch_size=32, seed=0,
                         phases=[{"name": "t", "epochs": 2, "lr": 3e-3}], cnn={"channels": [16, 32], "convs_per_block": 1})
    train(config, log=lambda line: None)
    return root


@pytest.fixture(scope="module")
def lab(run):
    """Class folders of a 'lab': 8 cells each of three classes, one class with only 3; plus unlabelled cells."""
    require(PBC224)
    folder, pool = run / "lab", run / "pool"
    for name, count in zip(LAB_CLASSES, (8, 8, 3)):
        (folder / name).mkdir(parents=True)
        for k, file in enumerate(sorted((PBC224 / name).glob("*.jpg"))[-count - 10 :][:count + 10]):
            image = other_lab(np.asarray(Image.open(file).convert("RGB").resize((48, 48))))
            target = folder / name if k < count else pool
            target.mkdir(exist_ok=True)
            Image.fromarray(image).save(target / f"{name}{k}.png")
    (pool / "broken.png").write_bytes(b"not an image")
    return {"labelled": folder, "unlabelled": pool}


def test_labelled_adaptation_writes_a_model_every_command_accepts(run, lab):
    lines = []
    summary = adapt_model(run / "run", run / "adapted", lab["labelled"], config=AdaptConfig(steps=20), folds=2,
                          log=lines.append)
    out = run / "adapted"
    for name in ("best.safetensors", "model.json", "shift.safetensors", "model.onnx", "adapt.json"):
        assert (out / name).is_file(), name
    contract = json.loads((out / "model.json").read_text())
    assert contract["adapted"]["mode"] == "labelled"
    assert contract["adapted"]["labelled_per_class"] == {"eosinophil": 8, "lymphocyte": 8, "neutrophil": 3}
    assert len(contract["class_names"]) == 8  # every class kept
    assert any("only 3 labelled neutrophil" in line for line in lines)
    assert any("cross-validated estimate" in line for line in lines)
    assert 0 <= summary["cross_validated"]["accuracy"] <= 1 and summary["cross_validated"]["folds"] == 2
    # The adapted directory and its ONNX file answer alike, with out-of-distribution scores.
    cells = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(lab["labelled"].rglob("*.png"))]
    torch_probs, torch_ood = load_predictor(out).scores(cells)
    onnx_probs, onnx_ood = load_predictor(out / "model.onnx").scores(cells)
    assert torch_probs.shape == (19, 8) and np.abs(torch_probs - onnx_probs).max() < 1e-4
    np.testing.assert_allclose(onnx_ood, torch_ood, rtol=1e-3, atol=1e-3)
    # The source model is untouched.
    assert "adapted" not in json.loads((run / "run" / "model.json").read_text()) or \
        json.loads((run / "run" / "model.json").read_text())["adapted"] is None


def test_adaptation_learns_the_labelled_cells():
    """Fine-tuning moves an untrained model to a lab's labels (here: one colour per class)."""
    torch.manual_seed(0)
    from bloodcell.models import CNNConfig, create_model

    model, _ = create_model("cnn", 8, pretrained=False, cnn=CNNConfig(channels=[8, 16], convs_per_block=1))
    labels = np.repeat([1, 4, 6], 8)
    tint = torch.tensor([[200, 60, 60], [60, 200, 60], [60, 60, 200]])[np.repeat([0, 1, 2], 8)]  # a colour per class
    images = (tint[:, :, None, None] + torch.randint(-40, 40, (24, 3, 32, 32))).clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        model.eval()
        before = (model(images).argmax(1).numpy() == labels).mean()
    finetune(model, images, labels, AdaptConfig(steps=60, lr=3e-3, to_source=0.0, augment={"enabled": False}))
    with torch.no_grad():
        after = (model(images).argmax(1).numpy() == labels).mean()
    assert after > max(before, 0.6)


def test_unlabelled_adaptation_skips_unreadable_files(run, lab):
    lines = []
    adapt_model(run / "run", run / "adapted-unl", None, lab["unlabelled"], AdaptConfig(steps=5),
                export=False, log=lines.append)
    contract = json.loads((run / "adapted-unl" / "model.json").read_text())
    assert contract["adapted"]["mode"] == "unlabelled" and contract["adapted"]["unlabelled_images"] == 30
    assert any("broken.png" in line and line.startswith("skipped") for line in lines)
    assert (run / "adapted-unl" / "to_label.csv").is_file()


def test_least_certain_ranks_by_the_margin_of_the_two_best_classes():
    from bloodcell.training.adapt import least_certain

    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.5, 0.1, 0.4], [0.34, 0.33, 0.33], [0.6, 0.4, 0.0]])
    # margins: 0.85, 0.05, 0.10, 0.01, 0.20
    assert least_certain(probs, 3).tolist() == [3, 1, 2]
    assert least_certain(probs, 10).tolist() == [3, 1, 2, 4, 0]
    assert least_certain(probs, 0).size == 0 and least_certain(np.zeros((0, 3)), 5).size == 0


def test_labelled_and_unlabelled_cells_list_the_cells_to_label_next(run, lab):
    import csv

    lines = []
    summary = adapt_model(run / "run", run / "adapted-next", lab["labelled"], lab["unlabelled"], AdaptConfig(steps=5),
                          folds=0, export=False, log=lines.append, suggest=7)
    with open(run / "adapted-next" / "to_label.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert summary["to_label"]["cells"] == len(rows) == 7
    pool = {str(p) for p in lab["unlabelled"].iterdir() if p.name != "broken.png"}
    assert {row["image"] for row in rows} <= pool and len({row["image"] for row in rows}) == 7
    margins = [float(row["margin"]) for row in rows]
    assert margins == sorted(margins) and all(float(r["confidence"]) >= float(r["second_confidence"]) for r in rows)
    assert any("to_label.csv" in line for line in lines)
    adapt_model(run / "run", run / "adapted-none", lab["labelled"], lab["unlabelled"], AdaptConfig(steps=2),
                folds=0, export=False, log=lines.append, suggest=0)
    assert not (run / "adapted-none" / "to_label.csv").exists()


def test_mean_alignment_moves_the_labs_mean_feature_onto_the_source_mean():
    """The last layer's answer on a lab cell becomes its answer on the cell's features shifted by the
    difference of the labs' means; nothing else in the network changes."""
    from bloodcell.models import CNNConfig, create_model
    from bloodcell.training.adapt import align_feature_mean

    torch.manual_seed(0)
    model, _ = create_model("cnn", 8, pretrained=False, cnn=CNNConfig(channels=[8, 16], convs_per_block=1))
    model.eval()
    images = torch.randint(0, 255, (10, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        features = model.features(images)
        source_mean = torch.randn(features.shape[1])
        expected = model.classify(features - features.mean(0) + source_mean)
        before = {k: v.clone() for k, v in model.state_dict().items()}
    align_feature_mean(model, images, source_mean)
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["net.head.3.bias"]


@pytest.mark.parametrize("case", ["unknown class", "onnx model", "same folder", "nothing"])
def test_adapt_refuses_in_one_clear_line(run, lab, tmp_path, case):
    args = {"model": run / "run", "out": tmp_path / "out", "labelled": lab["labelled"]}
    message = {"unknown class": "unknown class folder.*blast", "onnx model": "needs the PyTorch weights",
               "same folder": "never overwrites", "nothing": "needs --data"}[case]
    if case == "unknown class":
        bad = tmp_path / "bad"
        (bad / "blast").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad / "blast" / "a.png")
        args["labelled"] = bad
    elif case == "onnx model":
        args["model"] = tmp_path / "model.onnx"
    elif case == "same folder":
        args["out"] = run / "run"
    else:
        args["labelled"] = None
    with pytest.raises(BloodcellError, match=message):
        adapt_model(args["model"], args["out"], args["labelled"], None, AdaptConfig(steps=1), export=False,
                    log=lambda line: None)
    if case == "unknown class":  # the CLI prints the same line, no traceback
        result = CliRunner().invoke(cli, ["adapt", "--model", str(args["model"]), "--data", str(args["labelled"]),
                                          "--out", str(args["out"]), "--steps", "1"])
        assert result.exit_code == 2 and "blast" in result.output and "Traceback" not in result.output


def test_adapt_leaves_out_class_folders_it_does_not_know_when_asked(run, lab, tmp_path):
    """--skip-unknown: a lab's extra classes are left out with a line; the cells of known classes are all read."""
    mixed = tmp_path / "mixed"
    shutil.copytree(lab["labelled"], mixed)
    (mixed / "blast").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "blast" / "a.png")
    lines = []
    mixed_cells = load_labelled(mixed, list(CLASS_NAMES), 32, None, lines.append, skip_unknown=True)
    plain = load_labelled(lab["labelled"], list(CLASS_NAMES), 32, None, lambda line: None)
    labels, counts, plain_labels, plain_counts = mixed_cells.labels, mixed_cells.counts, plain.labels, plain.counts
    assert counts == plain_counts and np.array_equal(np.sort(labels), np.sort(plain_labels))
    assert "blast/: 1 cell(s) not a class of this model, left out" in lines


def test_calibrate_gives_an_older_run_its_shift_statistics(run, tmp_path):
    """A run without shift.safetensors (trained before it existed) gets it from `bloodcell calibrate`."""
    old = tmp_path / "old"
    shutil.copytree(run / "run", old)
    (old / "shift.safetensors").unlink()
    contract = json.loads((old / "model.json").read_text())
    contract.pop("shift")
    (old / "model.json").write_text(json.dumps(contract))
    assert not load_predictor(old).has_shift
    result = CliRunner().invoke(cli, ["calibrate", "--model", str(old), "--data", str(run / "data")])
    assert result.exit_code == 0, result.output
    shift = json.loads((old / "model.json").read_text())["shift"]
    assert shift["train_images"] == 320 and shift["val_images"] == 80 and shift["threshold_over_median"] > 1
    assert load_predictor(old).has_shift


def test_class_prior_is_recovered_from_unlabelled_answers():
    """EM on a calibrated model's posteriors finds a lab's class frequencies (Saerens et al. 2002)."""
    from bloodcell.training.adapt import estimate_class_prior

    rng = np.random.default_rng(0)
    true_prior = np.array([0.7, 0.2, 0.1])
    labels = rng.choice(3, 3000, p=true_prior)
    # A calibrated model trained under a uniform prior: likelihoods from Gaussian scores.
    scores = rng.normal(0, 1, (3000, 3)) + 1.5 * np.eye(3)[labels]
    likelihood = np.exp(-0.5 * (scores[:, :, None] - 1.5 * np.eye(3)[None]) ** 2).prod(1)
    posteriors = likelihood / likelihood.sum(1, keepdims=True)
    estimate = estimate_class_prior(posteriors, np.full(3, 1 / 3))
    np.testing.assert_allclose(estimate, true_prior, atol=0.03)
    assert np.abs(posteriors.mean(0) - true_prior).max() > 0.05  # the plain average is biased


def test_both_kinds_of_cells_set_the_labs_class_frequencies(run, lab):
    lines = []
    adapt_model(run / "run", run / "adapted-both", lab["labelled"], lab["unlabelled"],
                AdaptConfig(steps=5, lab_frequencies=True), folds=0, export=False, log=lines.append)
    prior = json.loads((run / "adapted-both" / "model.json").read_text())["adapted"]["class_prior"]
    assert len(prior) == 8 and abs(sum(prior.values()) - 1) < 1e-3 and min(prior.values()) > 0
    assert any("class frequencies" in line for line in lines)


def test_adapt_lists_the_labelled_cells_its_cross_validation_disputes(tmp_path):
    """Two eosinophils filed as neutrophils: the models adapted on the other folds call them eosinophils, and
    labels_to_review.csv lists them (least likely under their label first); cells filed right are left alone."""
    import csv

    pbc = require(PBC224)
    lab = tmp_path / "lab"
    for cls in ("lymphocyte", "neutrophil"):
        (lab / cls).mkdir(parents=True)
        for file in sorted((pbc / cls).glob("*.jpg"))[:6]:
            shutil.copy(file, lab / cls / file.name)
    misfiled = sorted((pbc / "eosinophil").glob("*.jpg"))[:2]
    for file in misfiled:
        shutil.copy(file, lab / "neutrophil" / file.name)
    lines: list[str] = []
    summary = adapt_model("default", tmp_path / "adapted", lab, None, AdaptConfig(steps=2), folds=3, export=False,
                          log=lines.append)
    rows = list(csv.DictReader((tmp_path / "adapted" / "labels_to_review.csv").read_text().splitlines()))
    listed = {Path(row["image"]).name: row for row in rows}
    assert {file.name for file in misfiled} <= set(listed)
    assert all(listed[f.name]["label"] == "neutrophil" and listed[f.name]["predicted"] == "eosinophil" for f in misfiled)
    assert len(rows) <= 3  # of the 12 filed right, one borderline cell at most
    confidence = [float(row["label_confidence"]) for row in rows]
    assert confidence == sorted(confidence)
    assert summary["labels_to_review"] == {"file": "labels_to_review.csv", "cells": len(rows)}
    assert any("check their labels" in line for line in lines)
