"""Fit a run's out-of-distribution statistics (:mod:`bloodcell.models.shift`) from its own data.

Class means and the shared covariance come from the training split's features; the threshold
(a score of 1) is the 99th percentile of the validation split's distances, so one held-out
image of the training lab in a hundred scores above 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..core.contract import read_contract, write_contract
from ..models import SHIFT_FILE, fit_shift_head, load_model, save_shift_head

QUANTILE = 0.99


@torch.no_grad()
def model_features(net, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Pre-logit features of a prepared uint8 (N, 3, S, S) batch, in eval mode."""
    net.eval()
    parts = [net.features(images[i : i + batch_size].contiguous(memory_format=torch.channels_last)).numpy()
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def fit_run_shift(run_dir: str | Path, train_images: torch.Tensor, train_labels: torch.Tensor,
                  val_images: torch.Tensor, log: Callable[[str], None] = print, quantile: float = QUANTILE) -> dict:
    """Write ``shift.safetensors`` beside a run's checkpoint and record it in its model.json."""
    run_dir = Path(run_dir)
    net, _ = load_model(run_dir)
    val_features = model_features(net, val_images)
    head = fit_shift_head(model_features(net, train_images), np.asarray(train_labels), val_features, quantile)
    with torch.no_grad():
        median = float(head.squared_distance(torch.from_numpy(val_features)).median())
    info = {"method": "mahalanobis", "file": SHIFT_FILE, "features": int(head.means.shape[1]),
            "quantile": quantile, "train_images": len(train_images), "val_images": len(val_images),
            # The threshold over the median held-out distance (squared): how a lab's spread of distances is
            # shaped. Adaptation estimates a new lab's threshold from its few cells' median times this.
            "threshold_over_median": round(float(head.threshold) / max(median, 1e-12), 4)}
    save_shift_head(run_dir, head, info)
    write_contract(run_dir, read_contract(run_dir).model_copy(update={"shift": info}))
    log(f"out-of-distribution statistics: {info['features']} features, {len(train_images)} training images, "
        f"threshold at the {quantile:.0%} quantile of {len(val_images)} validation images")
    return info


def calibrate_from_data(run_dir: str | Path, data: str | Path, log: Callable[[str], None] = print,
                        temperature: bool = True) -> dict:
    """Refit a run's temperature (validation split) and out-of-distribution statistics (train and
    validation splits) from the split dataset it was trained on: for runs trained before either existed."""
    from ..data import training_sources
    from ..data.splits import load_split
    from .calibration import calibrate_run

    run_dir = Path(run_dir)
    contract = read_contract(run_dir)
    sources, _ = training_sources(data)
    splits = {name: load_split(sources[name], contract.class_names, contract.image_size, framing=contract.framing)
              for name in ("train", "val")}
    result = {}
    if temperature:
        result["temperature"] = calibrate_run(run_dir, splits["val"].images, splits["val"].labels, log)
    result["shift"] = fit_run_shift(run_dir, splits["train"].images, splits["train"].labels, splits["val"].images, log)
    return result
