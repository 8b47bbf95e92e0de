"""Reading out-of-distribution scores (:mod:`bloodcell.models.shift` computes them): NumPy only.

Kept apart from the torch module that computes the scores, so that prediction with an ONNX
model never imports PyTorch.
"""

from __future__ import annotations

import statistics

import numpy as np

# A score above this is out of distribution: the threshold is folded into the score itself.
OOD_THRESHOLD = 1.0
_SMALL_BATCH = 32  # up to this many scores, batch_shift reads them in Python


def out_of_distribution(scores: np.ndarray | float) -> np.ndarray | bool:
    """Whether each score lies beyond the training lab's threshold (a bool for a Python float)."""
    if isinstance(scores, float):  # the service's per-image answers: no NumPy call for one number
        return scores > OOD_THRESHOLD
    return np.asarray(scores) > OOD_THRESHOLD


def batch_shift(scores: np.ndarray) -> dict:
    """A batch's verdict from its images' scores: flagged when its median image lies beyond the threshold.

    One image in a hundred of the training lab's own lies beyond it by construction, so the
    median of a batch of the lab's images almost never does; most of another lab's images do.
    """
    if len(scores) == 0:
        return {"flagged": False, "images_flagged": 0, "images": 0, "score": None}
    if len(scores) <= _SMALL_BATCH:  # the service's single-image requests: Python beats NumPy's call overhead
        values = np.asarray(scores, dtype=np.float64).tolist()
        median, flagged = statistics.median(values), sum(x > OOD_THRESHOLD for x in values)
    else:
        scores = np.asarray(scores, dtype=np.float64)
        median, flagged = float(np.median(scores)), int(out_of_distribution(scores).sum())
    return {"flagged": bool(out_of_distribution(median)), "images_flagged": flagged,
            "images": len(scores),
            "score": round(median, 4)}
