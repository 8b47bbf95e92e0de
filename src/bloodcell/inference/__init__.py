"""Inference: a model and its contract as a :class:`Predictor`, batch prediction, ONNX export."""

from .batch import collect_inputs, differential_count, predict_paths, prediction_row, shift_summary, to_check, write_predictions
from .predictor import DEFAULT_MODEL_DIR, ParallelRunner, Predictor, load_predictor, onnx_session, resolve_model

__all__ = [
    "collect_inputs", "differential_count", "predict_paths", "prediction_row", "shift_summary", "to_check",
    "write_predictions", "DEFAULT_MODEL_DIR",
    "ParallelRunner", "Predictor", "load_predictor", "onnx_session", "resolve_model",
]
