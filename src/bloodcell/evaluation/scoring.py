"""Logits of a prepared uint8 batch from any predictor backend, optionally averaged over flips and rotations."""

from __future__ import annotations

import numpy as np
import torch

from ..inference import Predictor


def backend_logits(predictor: Predictor, images: torch.Tensor, batch_size: int = 128, tta: bool = False) -> torch.Tensor:
    """Logits from any predictor backend (ONNX Runtime or PyTorch) for a uint8 (N, 3, S, S) batch."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        views = [batch]
        if tta:
            views = [torch.rot90(batch, k, dims=(2, 3)) for k in range(4)]
            views += [v.flip(3) for v in views]
        logits = [torch.from_numpy(predictor.run(np.ascontiguousarray(v.numpy()))) for v in views]
        outputs.append(torch.stack(logits).mean(0))
    return torch.cat(outputs)


def backend_ood(predictor: Predictor, images: torch.Tensor, batch_size: int = 128) -> np.ndarray | None:
    """Out-of-distribution scores of a prepared uint8 (N, 3, S, S) batch, or None when the model has no statistics."""
    if not predictor.has_shift:
        return None
    parts = [predictor.prepared_scores(images[start : start + batch_size].numpy())[1]
             for start in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
