"""Logits (and out-of-distribution scores) of a prepared uint8 batch from any predictor backend,
optionally averaged over flips and rotations."""

from __future__ import annotations

import numpy as np
import torch

from ..inference import Predictor


def backend_scores(predictor: Predictor, images: torch.Tensor, batch_size: int = 128,
                   tta: bool = False) -> tuple[torch.Tensor, np.ndarray | None]:
    """(logits, out-of-distribution scores or None) for a uint8 (N, 3, S, S) batch, in one pass.

    With ``tta`` the logits are averaged over the 8 flips and rotations; the scores are the
    plain view's, computed in the same network call as its logits.
    """
    outputs, scores = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        views = [batch]
        if tta:
            views = [torch.rot90(batch, k, dims=(2, 3)) for k in range(4)]
            views += [v.flip(3) for v in views]
        logits = []
        for index, view in enumerate(views):
            array = np.ascontiguousarray(view.numpy())
            if index == 0 and predictor.run_with_shift is not None:
                plain, ood = predictor.run_with_shift(array)
                scores.append(ood)
            else:
                plain = predictor.run(array)
            logits.append(torch.from_numpy(plain))
        outputs.append(torch.stack(logits).mean(0))
    ood = np.concatenate(scores) if scores else (np.zeros(0, np.float32) if predictor.has_shift else None)
    return torch.cat(outputs), ood


def backend_logits(predictor: Predictor, images: torch.Tensor, batch_size: int = 128, tta: bool = False) -> torch.Tensor:
    """Logits from any predictor backend (ONNX Runtime or PyTorch) for a uint8 (N, 3, S, S) batch."""
    return backend_scores(predictor, images, batch_size, tta)[0]
