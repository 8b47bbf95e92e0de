"""Reading out-of-distribution scores (:mod:`bloodcell.models.shift` computes them): NumPy only.

Kept apart from the torch module that computes the scores, so that prediction with an ONNX
model never imports PyTorch.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

# A score above this is out of distribution: the threshold is folded into the score itself.
OOD_THRESHOLD = 1.0
_SMALL_BATCH = 32  # up to this many scores, batch_shift reads them in Python
# The share of the training lab's own images allowed beyond the threshold. It sits at the 99% quantile of
# the validation images; measured beyond it: 1.0% of PBC validation, 1.7% of test, 1.5% of the originals.
SHIFT_BASE_RATE = 0.02
# A batch holding more images beyond the threshold than the training lab would give with this
# probability is flagged, whatever its median (docs/cross_lab.md).
SHIFT_ALPHA = 1e-4


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how likely ``k`` or more of ``n`` images beyond the threshold are
    for the training lab. Summed term by term in log space, from whichever side is the small one
    (scipy.stats.binom.sf is the reference in the tests); NumPy-free for the service's small batches."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    if k > n * p:  # above the mean: the upper tail's terms fall from k on
        log_term = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
        tail = 0.0
        for j in range(k, n + 1):
            term = math.exp(log_term)
            tail += term
            if term <= tail * 1e-17 or j == n:
                break
            log_term += math.log((n - j) / (j + 1)) + log_p - log_q
        return min(tail, 1.0)
    below, log_term = 0.0, n * log_q  # at or below the mean: 1 - P(X < k), whose terms are few and large
    for j in range(k):
        below += math.exp(log_term)
        log_term += math.log((n - j) / (j + 1)) + log_p - log_q
    return min(max(1.0 - below, 0.0), 1.0)


def out_of_distribution(scores: np.ndarray | float) -> np.ndarray | bool:
    """Whether each score lies beyond the training lab's threshold (a bool for a Python float)."""
    if isinstance(scores, float):  # the service's per-image answers: no NumPy call for one number
        return scores > OOD_THRESHOLD
    return np.asarray(scores) > OOD_THRESHOLD


def batch_shift(scores: np.ndarray) -> dict:
    """A batch's verdict from its images' scores.

    Flagged when its median image lies beyond the threshold, or when more of its images do than
    the training lab's own would with probability :data:`SHIFT_ALPHA` (a one-sided binomial test
    against :data:`SHIFT_BASE_RATE`). About one image in a hundred of the training lab's own lies
    beyond the threshold, so neither happens to a batch of its images. The median alone misses a
    lab whose images are only partly unlike (a third of them beyond it, say); the count does not.
    ``p_value`` is that test's.
    """
    if len(scores) == 0:
        return {"flagged": False, "images_flagged": 0, "images": 0, "score": None, "p_value": None}
    if len(scores) <= _SMALL_BATCH:  # the service's single-image requests: Python beats NumPy's call overhead
        values = np.asarray(scores, dtype=np.float64).tolist()
        median, flagged = statistics.median(values), sum(x > OOD_THRESHOLD for x in values)
    else:
        scores = np.asarray(scores, dtype=np.float64)
        median, flagged = float(np.median(scores)), int(out_of_distribution(scores).sum())
    p_value = binomial_tail(flagged, len(scores), SHIFT_BASE_RATE)
    return {"flagged": bool(out_of_distribution(median)) or p_value < SHIFT_ALPHA, "images_flagged": flagged,
            "images": len(scores), "score": round(median, 4), "p_value": float(f"{p_value:.3g}")}
