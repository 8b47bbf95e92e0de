"""Run directories and checkpoints: config and contract beside every run, best and last weights, exact resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from ..core.contract import ModelContract, write_contract
from ..models import load_checkpoint, save_checkpoint
from .config import TrainConfig


def make_run_dir(config: TrainConfig) -> Path:
    if config.out is not None:
        return Path(config.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.model}-{config.image_size}"

def write_run_files(run_dir: Path, config: TrainConfig, contract: ModelContract) -> None:
    """config.yaml (the resolved settings) and model.json (the model contract) of a run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
    write_contract(run_dir, contract)


def save_resume_point(run_dir: Path, model: nn.Module, ema, optimizer, scheduler, meta: dict) -> None:
    """``last.safetensors``: weights, EMA, optimizer and scheduler state, progress, to resume exactly."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    optim_tensors, optim_meta = flatten_optimizer(optimizer)
    # A LambdaLR's lambdas are code, rebuilt from the config on resume; only its counters are saved.
    schedule_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    save_checkpoint(run_dir / "last.safetensors", {**tensors, **optim_tensors},
                    {**meta, "optimizer": optim_meta, "scheduler": schedule_state})

def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as safetensors-ready tensors and JSON-ready scalars (``restore_optimizer`` reverses it)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

def last_epoch_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights a run validated at its last epoch (the EMA's where it kept one), from ``last.safetensors``.

    What ``keep: last`` would have kept; for comparing it with the best checkpoint of a finished run.
    """
    tensors, meta = load_checkpoint(Path(run_dir) / "last.safetensors")
    ema = {k[len("ema.module."):]: v for k, v in tensors.items() if k.startswith("ema.module.")}
    weights = ema or {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    kept = {k: meta[k] for k in ("model", "class_names", "image_size", "mean", "std", "epoch") if k in meta}
    if meta.get("rows"):  # the last epoch's validation figures, as a kept checkpoint records them
        row = meta["rows"][-1]
        kept["val"] = {"loss": row["val_loss"], "accuracy": row["val_accuracy"], "macro_f1": row["val_macro_f1"]}
    return weights, kept
