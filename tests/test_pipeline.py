"""The main job wired end to end on 200 real originals (tiny settings): every step runs and the report renders."""

import json

import pytest

from bloodcell import pipeline

from .conftest import require
from .test_train import WEIGHTS


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

    from bloodcell.report import html_to_pdf

    from .browser import broken_images, chromium_path, open_page

    chromium_path()  # skips when Chromium is missing
    pdf = html_to_pdf(report)
    assert pdf is not None and pdf.read_bytes()[:4] == b"%PDF"

    with open_page(report.as_uri()) as (page, errors):
        assert page.evaluate("document.images.length") >= 8
        assert broken_images(page) == []
        assert errors == []
