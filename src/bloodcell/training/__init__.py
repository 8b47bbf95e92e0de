"""Training: typed configs, the loop, freezing phases, checkpoints, distributed helpers, distillation."""

from .config import (
    PhaseConfig,
    ProgressiveConfig,
    SubclassConfig,
    TrainConfig,
    build_train_config,
    load_settings,
    merge_settings,
    parse_overrides,
    scale_epochs,
)
from .trainer import TrainResult, train

__all__ = [
    "PhaseConfig", "ProgressiveConfig", "SubclassConfig", "TrainConfig", "build_train_config", "load_settings",
    "merge_settings", "parse_overrides", "scale_epochs", "TrainResult", "train",
]
