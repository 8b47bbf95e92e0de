"""The model contract: what a trained model needs to be used exactly as it was trained.

Written as ``model.json`` beside every run and into the ONNX metadata (key ``bloodcell``), and
read back by evaluate, predict, export, serve and every ``--model``. It carries a
``schema_version``; files written before it existed (version 0, a plain dict) load through
:func:`migrate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BloodcellError

SCHEMA_VERSION = 1
RESIZE = ("PIL bicubic of the whole image (or of the framing crop) to image_size x image_size "
          "(bloodcell.data.preprocess)")
INPUT = "uint8 RGB, N x 3 x H x W"


class Subclasses(BaseModel):
    names: list[str]  # "class:subclass", or the class's own name for its remainder
    parents: list[int]  # each subclass's class index


class ModelContract(BaseModel):
    """Everything that must travel with a model's weights."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: int = SCHEMA_VERSION
    model: str = Field(description="'cnn' or a timm model name")
    class_names: list[str]
    image_size: int = Field(ge=1)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input: str = INPUT
    resize: str = RESIZE
    framing: dict[str, Any] | None = Field(None, description="bloodcell.data.framing.FramingConfig, or None")
    input_norm: str | None = Field(None, description="inside the network before mean/std: None, 'grey_world' colour constancy, 'grey' (luminance only) or 'reinhard' (colour statistics standardised)")
    per_image_norm: int = Field(0, ge=0, description="the first this many stages' BatchNorms normalise each image by its own statistics")
    cnn: dict[str, Any] | None = Field(None, description="bloodcell.models.CNNConfig of the custom CNN")
    subclasses: Subclasses | None = None
    temperature: float = Field(1.0, gt=0, description="softmax temperature fitted on validation")
    val_ece_before: float | None = None
    val_ece_after: float | None = None
    val_nll_before: float | None = None
    val_nll_after: float | None = None
    shift: dict[str, Any] | None = Field(
        None, description="out-of-distribution statistics stored beside the weights (bloodcell.models.shift), or None")
    ood_temperature: float = Field(
        0.0, ge=0, description="gamma: where the out-of-distribution score s exceeds 1, the logits are divided by "
        "temperature * s ** gamma (confidence falls with the distance to the training lab); fitted on synthetic "
        "shifts of the validation split (bloodcell.evaluation.shift); 0 leaves every answer's confidence as fitted")
    adapted: dict[str, Any] | None = Field(
        None, description="what the model was adapted on (bloodcell adapt): mode, images, classes, source model")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def migrate(data: dict, where: str = "model.json") -> dict:
    """Bring an older contract to the current schema."""
    data = dict(data)
    version = int(data.get("schema_version", 0))
    if version > SCHEMA_VERSION:
        raise BloodcellError(f"{where}: model contract version {version} was written by a newer bloodcell "
                             f"(this one reads up to {SCHEMA_VERSION}); upgrade bloodcell")
    if version == 0:  # before the typed contract: the same keys, temperature possibly null
        if data.get("temperature") is None:
            data["temperature"] = 1.0
        data.setdefault("input", INPUT)
        data.setdefault("resize", RESIZE)
        data["schema_version"] = SCHEMA_VERSION
    return data


def parse_contract(data: dict | str, where: str = "model.json") -> ModelContract:
    """A contract from a dict or JSON text, migrated and validated; errors name ``where``."""
    try:
        raw = json.loads(data) if isinstance(data, str) else data
    except json.JSONDecodeError as exc:
        raise BloodcellError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BloodcellError(f"{where}: expected a JSON object")
    try:
        return ModelContract.model_validate(migrate(raw, where))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise BloodcellError(f"{where}: not a valid model contract ({problems})") from None


def read_contract(path: str | Path) -> ModelContract:
    """``model.json`` of a run directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.json"
    if not path.is_file():
        raise BloodcellError(f"{path.parent}: not a bloodcell run (no model.json)")
    return parse_contract(path.read_text(), str(path))


def write_contract(path: str | Path, contract: ModelContract) -> Path:
    """Write ``model.json`` (into ``path`` when it is a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.json"
    path.write_text(contract.to_json())
    return path
