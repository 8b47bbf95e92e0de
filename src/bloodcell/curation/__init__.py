"""Curation: exact and near duplicates, label conflicts, contaminants, grouped splits, leakage, the report."""

from .config import CurateConfig, SplitConfig
from .curator import assign_splits, check_leakage, class_weights, curate, decide, scan
from .result import SPLITS, STATUSES, Curation, summarise

__all__ = [
    "CurateConfig", "SplitConfig", "assign_splits", "check_leakage", "class_weights", "curate", "decide", "scan",
    "SPLITS", "STATUSES", "Curation", "summarise",
]
