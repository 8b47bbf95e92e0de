"""The main job wired end to end on 200 real originals (tiny settings): every step runs and the report renders."""

import json

import pytest
import yaml

from bloodcell import workflows as pipeline
from bloodcell.core.errors import BloodcellError

from .conftest import require
from .test_train import WEIGHTS


@pytest.mark.slow
@pytest.mark.browser
def test_quick_pipeline_end_to_end(tmp_path, original_files, monkeypatch):
    require(WEIGHTS)
    tiny = {
        "cnn": {"image_size": 32, "phases": [{"name": "train", "epochs": 1, "lr": 3e-3, "trainable": "all"}],
                "cnn": {"channels": [8, 16], "convs_per_block": 1}},
        "mobilenet": {"image_size": 32, "phases": [{"name": "head", "epochs": 1, "lr": 3e-3, "trainable": "head"},
                                                   {"name": "finetune", "epochs": 1, "lr": 1e-3, "trainable": "top:2"}]},
        "corruption_images": 10,
    }
    monkeypatch.setitem(pipeline.PROFILES, "tiny", tiny)
    data = original_files[0].parents[1]
    lines = []
    report = pipeline.run_pipeline(data, tmp_path / "out", "tiny", WEIGHTS, log=lines.append)
    assert report == tmp_path / "out" / "report.html"
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert any(line.startswith(step) for line in lines), step
    metrics = json.loads((tmp_path / "out" / "mobilenet" / "evaluation" / "metrics.json").read_text())
    assert metrics["corruptions"]["images"] == 10 and len(metrics["corruptions"]["accuracy"]) == 12
    assert (tmp_path / "out" / "comparison" / "comparison.png").is_file()
    html = report.read_text()
    assert "Baseline" in html and "Robustness" in html and "Worst-classified" in html

    from bloodcell.core.html import html_to_pdf

    from .browser import broken_images, chromium_path, open_page

    chromium_path()  # skips when Chromium is missing
    pdf = html_to_pdf(report)
    assert pdf is not None and pdf.read_bytes()[:4] == b"%PDF"

    with open_page(report.as_uri()) as (page, errors):
        assert page.evaluate("document.images.length") >= 8
        assert broken_images(page) == []
        assert errors == []


@pytest.mark.slow
def test_recipe_curates_trains_calibrates_and_exports(tmp_path, original_files):
    """The packaged default-model recipe, shrunk: one call ends with a checked, calibrated ONNX model."""
    require(WEIGHTS)
    config = pipeline.RecipeConfig(**pipeline.packaged_config("default_model.yaml"))
    config.train.update(image_size=32, weights=str(WEIGHTS), phases=[
        {"name": "head", "epochs": 1, "lr": 3e-3, "trainable": "head"},
        {"name": "finetune", "epochs": 1, "lr": 1e-3, "trainable": "all"}])
    config.export.check_images = 8
    data = original_files[0].parents[1]
    lines = []
    summary = pipeline.run_recipe(config, data, tmp_path / "out", log=lines.append)
    out = tmp_path / "out"
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/3]", "[2/3]", "[3/3]"]
    assert (out / "curated" / "manifest.csv").is_file()
    meta = json.loads((out / "train" / "model.json").read_text())
    assert meta["temperature"] > 0  # calibrated at the end of training
    from bloodcell.inference import load_predictor

    predictor = load_predictor(out / "model.onnx")
    assert predictor.class_names == meta["class_names"]
    assert summary["export"]["checked_images"] == 8 and summary["export"]["max_prob_diff"] < 1e-3
    # tf_mobilenetv3's five strided 'SAME' convolutions: padding frozen and merged into them.
    assert summary["export"]["same_padding_frozen"] == 5 and summary["export"]["pads_merged"] == 5
    saved = yaml.safe_load((out / "summary.yaml").read_text())
    assert saved["timings"]["total_s"] >= saved["timings"]["curate_s"] > 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["image_size"] == 32


def test_recipe_rejects_bad_configs_before_any_work(tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("train: {model: cnn, image_size: 4}\n")
    with pytest.raises(BloodcellError, match="bad train settings"):
        pipeline.run_recipe(pipeline.load_recipe(bad), tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    bad.write_text("train: {data: somewhere}\n")
    with pytest.raises(BloodcellError, match="train.data is set by the recipe"):
        pipeline.run_recipe(pipeline.load_recipe(bad), tmp_path / "nowhere", tmp_path / "out")
    bad.write_text("curate: {near_dhash: 99}\ntrain: {}\n")
    with pytest.raises(BloodcellError, match="not a valid recipe config"):
        pipeline.load_recipe(bad)
