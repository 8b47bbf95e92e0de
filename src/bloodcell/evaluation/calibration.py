"""Calibration: a softmax temperature fitted on the validation split (Guo et al. 2017)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..core.contract import read_contract, write_contract
from ..inference import load_predictor
from .metrics import expected_calibration_error
from .scoring import backend_logits


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al. 2017), within ``bounds``.

    A grid over log T first, then L-BFGS from the best grid point: L-BFGS alone, started at
    T = 1, diverged to NaN on a barely trained model whose logits carry almost no signal.
    """
    logits, labels = logits.detach().float(), labels.detach()
    criterion = torch.nn.CrossEntropyLoss()
    grid = torch.linspace(math.log(bounds[0]), math.log(bounds[1]), 241)
    with torch.no_grad():
        losses = torch.stack([criterion(logits / t.exp(), labels) for t in grid])
    best = int(torch.nan_to_num(losses, nan=float("inf")).argmin())
    log_t = grid[best].clone().reshape(1).requires_grad_(True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = criterion(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    refined = float(log_t.detach().clamp(math.log(bounds[0]), math.log(bounds[1])).exp())
    with torch.no_grad():
        refined_loss = float(criterion(logits / refined, labels)) if math.isfinite(refined) else float("inf")
    chosen = refined if refined_loss <= float(losses[best]) else float(grid[best].exp())
    return min(max(chosen, bounds[0]), bounds[1])  # exact bounds despite float32 rounding


def calibrate_run(run_dir: Path, images: torch.Tensor, labels: torch.Tensor,
                  log: Callable[[str], None] = print) -> float:
    """Fit a softmax temperature on validation images (uint8 N x 3 x S x S) for a run's best checkpoint;
    store it, with the calibration error before and after, in the run's model.json."""
    logits = backend_logits(load_predictor(run_dir), images)
    temperature = fit_temperature(logits, labels)
    truth = labels.numpy()
    before = expected_calibration_error(torch.softmax(logits, 1).numpy(), truth)
    after = expected_calibration_error(torch.softmax(logits / temperature, 1).numpy(), truth)
    nll = nn.functional.cross_entropy
    contract = read_contract(run_dir).model_copy(update=dict(
        temperature=temperature, val_ece_before=before, val_ece_after=after,
        val_nll_before=float(nll(logits, labels)), val_nll_after=float(nll(logits / temperature, labels))))
    write_contract(run_dir, contract)
    log(f"temperature {temperature:.3f} fitted on validation: ECE {before:.2%} -> {after:.2%}")
    return temperature
