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
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from .curate import CurateConfig, curate
from .data import BloodcellError
from .evaluate import compare_runs, evaluate_model
from .report import write_run_report
from .train import TrainConfig, train

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


def run_pipeline(data: Path, out: Path, profile: str = "quick", weights: Path | None = None,
                 log: Callable[[str], None] = print, progress_factory=None) -> Path:
    """Run every step; returns the path of the final report."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose {', '.join(PROFILES)}")
    settings = PROFILES[profile]
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
                                       corruption_limit=settings["corruption_images"])
                   for key, run in runs.items()}
    names = evaluations["mobilenet"]["confusion_matrix"]["classes"]
    compare_runs(evaluations["cnn"], evaluations["mobilenet"], names, out / "comparison")
    timings["evaluate"] = time.perf_counter() - t0
    log("[5/5] writing the report")
    report = write_run_report(runs["mobilenet"], evaluations["mobilenet"], baseline=(runs["cnn"], evaluations["cnn"]),
                              out=out / "report.html")
    from .report import html_to_pdf

    pdf = html_to_pdf(report)
    if pdf:
        log(f"PDF: {pdf}")
    timings["total"] = time.perf_counter() - start
    (out / "timings.yaml").write_text(yaml.safe_dump({k: round(v, 1) for k, v in timings.items()}))
    for key, result in evaluations.items():
        log(f"{key}: test accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, "
            f"corrupted mean {result['corruptions']['mean']:.4f}")
    return report


# ---------------------------------------------------------------- the default-model recipe


class ExportSettings(BaseModel):
    quantize: Literal["dynamic", "static"] | bool | None = Field(
        None, description="also write an int8 model: dynamic (true) or static (see `bloodcell export`)")
    check_images: int = Field(256, ge=1, description="validation images on which ONNX Runtime is checked against PyTorch")


class RecipeConfig(BaseModel):
    """One file for the whole recipe of a deployable model: curate -> train -> calibrate -> export.

    ``train`` holds a training config without ``data`` and ``out``: the recipe
    trains on what it curated, into its own folder.
    """

    curate: CurateConfig = CurateConfig()
    train: dict
    export: ExportSettings = ExportSettings()

    def train_config(self, data: Path, out: Path) -> TrainConfig:
        stray = sorted({"data", "out"} & set(self.train))
        if stray:
            raise BloodcellError(f"recipe: train.{stray[0]} is set by the recipe itself; remove it from the config")
        try:
            return TrainConfig(**{**self.train, "data": data, "out": out})
        except ValidationError as exc:
            raise BloodcellError(f"recipe: bad train settings: {exc}") from None


def load_recipe(path: Path) -> RecipeConfig:
    if not Path(path).is_file():
        raise BloodcellError(f"{path}: recipe config not found")
    try:
        return RecipeConfig(**(yaml.safe_load(Path(path).read_text()) or {}))
    except (yaml.YAMLError, ValidationError) as exc:
        raise BloodcellError(f"{path}: not a valid recipe config ({exc})") from None


def run_recipe(config: RecipeConfig, data: Path, out: Path, log: Callable[[str], None] = print,
               progress_factory=None) -> dict:
    """Curate ``data``, train and fine-tune, fit the temperature, export ONNX; returns a summary.

    Everything lands in ``out``: curated/, train/ (the run directory, calibrated),
    model.onnx, recipe.yaml (the resolved config) and summary.yaml (timings, export check).
    """
    from .predict import check_set, export_onnx

    out = Path(out)
    train_config = config.train_config(out / "curated", out / "train")  # fail on a bad config before any work
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    timings = {}
    start = time.perf_counter()
    log(f"[1/3] curating {data}")
    curate(data, out / "curated", config.curate)
    timings["curate_s"] = time.perf_counter() - start
    log(f"[2/3] training {train_config.model} at {train_config.image_size} px "
        f"({' + '.join(f'{p.epochs} {p.name}' for p in train_config.phases)} epochs), then calibrating")
    t0 = time.perf_counter()
    run_dir = train(train_config, log=log, progress_factory=progress_factory).run_dir
    timings["train_and_calibrate_s"] = time.perf_counter() - t0
    log("[3/3] exporting to ONNX and checking it against PyTorch")
    t0 = time.perf_counter()
    images, labels = check_set(out / "curated", config.export.check_images)
    export = export_onnx(run_dir, out / "model.onnx", images, config.export.quantize, labels)
    timings["export_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    summary = {"run": str(run_dir), "timings": {k: round(v, 1) for k, v in timings.items()}, "export": export}
    (out / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    log(f"done in {timings['total_s'] / 60:.1f} min: {out / 'model.onnx'}")
    return summary
