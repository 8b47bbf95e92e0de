"""The default-model recipe: curate -> train -> calibrate -> export, from one config file."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from ..core.errors import BloodcellError
from ..core.settings import resolve_data
from ..curation import CurateConfig, curate
from ..inference.export import check_set, export_onnx
from ..training import TrainConfig, merge_settings, parse_overrides, train


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


def load_recipe(path: Path, overrides: list[str] = ()) -> RecipeConfig:
    """A recipe file, with ``key=value`` overrides (``train.image_size=96``) merged in."""
    if not Path(path).is_file():
        raise BloodcellError(f"{path}: recipe config not found")
    try:
        config = RecipeConfig(**(yaml.safe_load(Path(path).read_text()) or {}))
    except (yaml.YAMLError, ValidationError) as exc:
        raise BloodcellError(f"{path}: not a valid recipe config ({exc})") from None
    if not overrides:
        return config
    merged = merge_settings(config.model_dump(mode="json"), parse_overrides(list(overrides)))
    try:
        return RecipeConfig(**merged)
    except ValidationError as exc:
        raise BloodcellError(f"--set: {exc}") from None


def run_recipe(config: RecipeConfig, data: Path | None, out: Path, log: Callable[[str], None] = print,
               progress_factory=None) -> dict:
    """Curate ``data``, train and fine-tune, fit the temperature, export ONNX; returns a summary.

    Everything lands in ``out``: curated/, train/ (the run directory, calibrated),
    model.onnx, recipe.yaml (the resolved config) and summary.yaml (timings, export check).
    """
    out = Path(out)
    train_config = config.train_config(out / "curated", out / "train")  # fail on a bad config before any work
    data = resolve_data(data)
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
