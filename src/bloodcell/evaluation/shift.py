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
OOD_TEMPERATURES = np.arange(0.0, 8.01, 0.25)  # the gammas tried


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


def synthetic_shifts(images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Two altered copies of each prepared uint8 (N, 3, S, S) image, and the index of the image each
    copy comes from, as other labs might show it:
    one corruption family at severity 5 (the families taken in turn), and a random stain matrix
    under a lamp of another colour (:class:`bloodcell.data.augment.StainMatrix`, ``Illuminant``)."""
    from ..data.augment import Illuminant, StainMatrix
    from ..data.corruptions import CORRUPTIONS, corrupt

    families = sorted(CORRUPTIONS)
    stain, lamp = StainMatrix(0.35), Illuminant(0.4)
    out = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for k, image in enumerate(images):
            changed = corrupt(image.permute(1, 2, 0).numpy(), families[k % len(families)], 5, seed + k)
            out.append(torch.from_numpy(np.array(changed)).permute(2, 0, 1))  # a writable copy
            out.append(lamp(stain(image)))
    return (torch.stack(out) if out else images[:0]), np.repeat(np.arange(len(images)), 2)


def fit_ood_temperature(logits: np.ndarray, ood: np.ndarray, labels: np.ndarray, temperature: float,
                        gammas: np.ndarray = OOD_TEMPERATURES) -> tuple[float, float]:
    """The gamma of ``temperature * max(1, ood) ** gamma`` with the least NLL on these labelled cells; (gamma, NLL)."""
    labels = np.asarray(labels)
    stretch = np.maximum(np.asarray(ood, np.float64), 1.0)
    best = (0.0, np.inf)
    for gamma in gammas:
        scaled = np.asarray(logits, np.float64) / (temperature * stretch[:, None] ** gamma)
        scaled -= scaled.max(1, keepdims=True)
        log_p = scaled - np.log(np.exp(scaled).sum(1, keepdims=True))
        nll = float(-log_p[np.arange(len(labels)), labels].mean())
        if nll < best[1] - 1e-9:
            best = (float(gamma), nll)
    return best


def fit_run_ood_temperature(run_dir: str | Path, val_images: torch.Tensor, val_labels: torch.Tensor,
                            log: Callable[[str], None] = print) -> dict:
    """Fit a run's ``ood_temperature`` on its validation images and their synthetic shifts; record it in model.json.

    No other lab's labels are used: the synthetic shifts stand in for them. Measured on Jiangxi
    Tecom with the shipped model, every gamma from 1 to 7 lowered its ECE (docs/experiments.md).
    """
    from ..inference import load_predictor
    from .scoring import backend_scores

    run_dir = Path(run_dir)
    predictor = load_predictor(run_dir)
    if predictor.run_with_shift is None:
        raise ValueError(f"{run_dir}: no out-of-distribution statistics to fit a shift temperature on")
    shifted, source = synthetic_shifts(val_images)
    images = torch.cat([val_images, shifted])
    labels = np.concatenate([np.asarray(val_labels), np.asarray(val_labels)[source]])
    logits, ood = backend_scores(predictor, images)
    logits = logits.numpy()
    gamma, nll = fit_ood_temperature(logits, ood, labels, predictor.temperature)
    info = {"ood_temperature": gamma, "images": len(images), "nll": round(nll, 4),
            "nll_without": round(fit_ood_temperature(logits, ood, labels, predictor.temperature, np.zeros(1))[1], 4),
            "shifted_median_score": round(float(np.median(ood[len(val_images):])), 4)}
    write_contract(run_dir, read_contract(run_dir).model_copy(update={"ood_temperature": gamma}))
    log(f"shift temperature: gamma {gamma:g} fitted on {len(val_images)} validation images and {2 * len(val_images)} "
        f"synthetic shifts of them (NLL {info['nll_without']:.3f} -> {nll:.3f})")
    return info


def calibrate_from_data(run_dir: str | Path, data: str | Path, log: Callable[[str], None] = print,
                        temperature: bool = True) -> dict:
    """Refit a run's temperature (validation split), out-of-distribution statistics (train and
    validation splits) and shift temperature (validation split and its synthetic shifts) from the
    split dataset it was trained on: for runs trained before these existed."""
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
    result["ood_temperature"] = fit_run_ood_temperature(run_dir, splits["val"].images, splits["val"].labels, log)
    return result
