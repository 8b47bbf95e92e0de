"""Checkpoints: safetensors files written atomically (never a pickle), and trained models loaded back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core.contract import ModelContract, read_contract
from ..core.errors import BloodcellError
from .factory import Classifier, CNNConfig, create_model
from .shift import SHIFT_FILE, ShiftHead


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a safetensors file atomically: a kill mid-write leaves the old file intact."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"bloodcell": json.dumps(meta)})
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise BloodcellError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("bloodcell", "{}"))
        return load_file(str(path)), meta
    except Exception as exc:  # noqa: BLE001
        raise BloodcellError(f"{path}: not a readable bloodcell checkpoint ({exc})") from None


def build_from_contract(contract: ModelContract) -> Classifier:
    """An untrained classifier with the architecture a contract describes."""
    cnn = CNNConfig(**contract.cnn) if contract.cnn else None
    parents = contract.subclasses.parents if contract.subclasses else None
    model, _ = create_model(contract.model, len(contract.class_names), pretrained=False, cnn=cnn,
                            subclass_parents=parents, input_norm=contract.input_norm,
                            per_image_norm=contract.per_image_norm)
    return model


def load_model(path: str | Path) -> tuple[Classifier, ModelContract]:
    """A trained classifier from a run directory (its best checkpoint) or a checkpoint file, in eval mode."""
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    checkpoint = path / "best.safetensors" if path.is_dir() else path
    if not (run_dir / "model.json").is_file():
        raise BloodcellError(f"{path}: not a bloodcell run (no model.json beside the checkpoint)")
    contract = read_contract(run_dir)
    tensors, _ = load_checkpoint(checkpoint)
    tensors = {k[6:] if k.startswith("model.") else k: v for k, v in tensors.items() if not k.startswith(("optim.", "ema."))}
    model = build_from_contract(contract)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise BloodcellError(f"{checkpoint}: does not fit {contract.model} ({str(exc).splitlines()[1].strip()})") from None
    model.eval()
    return model, contract


def load_shift_head(path: str | Path) -> ShiftHead | None:
    """The out-of-distribution statistics stored beside a run's checkpoint, or None when it has none."""
    path = Path(path)
    file = (path if path.is_dir() else path.parent) / SHIFT_FILE
    if not file.is_file():
        return None
    tensors, _ = load_checkpoint(file)
    try:
        return ShiftHead(tensors["means"], tensors["precision"], tensors["threshold"])
    except KeyError as exc:
        raise BloodcellError(f"{file}: not a bloodcell shift-statistics file (no {exc})") from None


def save_shift_head(directory: str | Path, head: ShiftHead, meta: dict) -> Path:
    """Write a run's out-of-distribution statistics beside its checkpoint."""
    path = Path(directory) / SHIFT_FILE
    save_checkpoint(path, head.tensors(), meta)
    return path
