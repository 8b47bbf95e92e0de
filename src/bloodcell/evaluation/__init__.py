"""Evaluation: metrics, calibration, robustness, figures and the run report."""

from .calibration import calibrate_run, fit_temperature
from .evaluate import evaluate_model, load_eval_images
from .scoring import backend_logits
from .metrics import abstain_table, compute_metrics, expected_calibration_error, macro_f1
from .plots import compare_runs

__all__ = [
    "calibrate_run", "fit_temperature", "backend_logits", "evaluate_model", "load_eval_images", "abstain_table",
    "compute_metrics", "expected_calibration_error", "macro_f1", "compare_runs",
]
