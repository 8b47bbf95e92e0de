"""Reading out-of-distribution scores (:mod:`bloodcell.models.shift` computes them): NumPy only.

Kept apart from the torch module that computes the scores, so that prediction with an ONNX
model never imports PyTorch.
"""

from __future__ import annotations

import numpy as np

# A score above this is out of distribution: the threshold is folded into the score itself.
OOD_THRESHOLD = 1.0


def out_of_distribution(scores: np.ndarray | float) -> np.ndarray | bool:
    """Whether each score lies beyond the training lab's threshold."""
    return np.asarray(scores) > OOD_THRESHOLD


def batch_shift(scores: np.ndarray) -> dict:
    """A batch's verdict from its images' scores: flagged when its median image lies beyond the threshold.

    One image in a hundred of the training lab's own lies beyond it by construction, so the
    median of a batch of the lab's images almost never does; most of another lab's images do.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return {"flagged": False, "images_flagged": 0, "images": 0, "score": None}
    median = float(np.median(scores))
    return {"flagged": bool(out_of_distribution(median)), "images_flagged": int(out_of_distribution(scores).sum()),
            "images": len(scores),
            "score": round(median, 4)}
