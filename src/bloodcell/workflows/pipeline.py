"""The main job: curate -> train the custom CNN -> fine-tune MobileNetV3 -> evaluate -> report.

Two profiles: ``quick`` (small inputs and few epochs, under 15 minutes on 2
cores, to see every step work) and ``full`` (the shipped configs, for real
results).  Every step writes into its own folder under ``out``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import yaml

from ..core.errors import BloodcellError
from ..core.html import html_to_pdf
from ..core.settings import resolve_data
from ..curation import CurateConfig, curate
from ..evaluation import compare_runs, evaluate_model
from ..evaluation.report import write_run_report
from ..training import TrainConfig, train

PROFILES = {
    "quick": {
        "cnn": {"image_size": 48, "phases": [{"name": "train", "epochs": 4, "lr": 3e-3, "trainable": "all"}],
                "cnn": {"channels": [32, 64, 128], "convs_per_block": 1}},
        "mobilenet": {"image_size": 96, "phases": [{"name": "head", "epochs": 1, "lr": 3e-3, "trainable": "head"},
                                                   {"name": "finetune", "epochs": 3, "lr": 1e-3, "trainable": "top:4"}]},
        "corruption_images": 300,
    },
    "full": {"cnn": {}, "mobilenet": {}, "corruption_images": None},
}


def packaged_config(name: str) -> dict:
    return yaml.safe_load(resources.files("bloodcell").joinpath("configs", name).read_text())


def run_pipeline(data: Path | None, out: Path, profile: str = "quick", weights: Path | None = None,
                 log: Callable[[str], None] = print, progress_factory=None) -> Path:
    """Run every step; returns the path of the final report."""
    if profile not in PROFILES:
        raise BloodcellError(f"unknown profile {profile!r}: use {' or '.join(PROFILES)}")
    settings = PROFILES[profile]
    data = resolve_data(data)
    out = Path(out)
    timings = {}
    start = time.perf_counter()
    log(f"[1/5] curating {data}")
    curate(data, out / "curated", CurateConfig())
    timings["curate"] = time.perf_counter() - start

    runs = {}
    for step, (key, config_name) in enumerate((("cnn", "cnn.yaml"), ("mobilenet", "mobilenetv3_small.yaml")), start=2):
        config = {**packaged_config(config_name), **settings[key], "data": out / "curated", "out": out / key}
        if key == "mobilenet":
            config["weights"] = weights
            config["pretrained"] = True
        log(f"[{step}/5] training {config['model']} at {config['image_size']} px")
        t0 = time.perf_counter()
        runs[key] = train(TrainConfig(**config), log=log, progress_factory=progress_factory).run_dir
        timings[key] = time.perf_counter() - t0

    log("[4/5] evaluating both on the test split, with corruptions")
    t0 = time.perf_counter()
    evaluations = {key: evaluate_model(run, out / "curated", run / "evaluation", corruptions=True,
                                       corruption_limit=settings["corruption_images"], fields=False)
                   for key, run in runs.items()}
    names = evaluations["mobilenet"]["confusion_matrix"]["classes"]
    compare_runs(evaluations["cnn"], evaluations["mobilenet"], names, out / "comparison")
    timings["evaluate"] = time.perf_counter() - t0
    log("[5/5] writing the report")
    report = write_run_report(runs["mobilenet"], evaluations["mobilenet"], baseline=(runs["cnn"], evaluations["cnn"]),
                              out=out / "report.html")
    pdf = html_to_pdf(report)
    if pdf:
        log(f"PDF: {pdf}")
    timings["total"] = time.perf_counter() - start
    (out / "timings.yaml").write_text(yaml.safe_dump({k: round(v, 1) for k, v in timings.items()}))
    for key, result in evaluations.items():
        log(f"{key}: test accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, "
            f"corrupted mean {result['corruptions']['mean']:.4f}")
    return report
