"""What curation found: the :class:`Curation` result and its summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..data.sources import Source
from .config import CurateConfig

STATUSES = ("keep", "duplicate", "near_duplicate", "outlier", "label_conflict", "unreadable")
SPLITS = ("train", "val", "test")


@dataclass
class OutlierModel:
    """What this dataset's unique images look like, for judging each one against the rest."""

    center: np.ndarray  # robust centre and scale of the statistics and the embedding
    scale: np.ndarray
    projection: object  # PCA of the standardised vector
    reference: np.ndarray  # projected vectors of (a sample of) the unique images
    k: int
    median: float  # of the k-NN distance over the reference
    mad: float
    ranges: dict[str, tuple[float, float]]  # 1st-99th percentile of each statistic


@dataclass
class Curation:
    """The outcome of curating one source; ``rows`` mirror manifest.csv."""

    source: Source
    config: CurateConfig
    rows: list[dict]
    groups: dict[int, list[int]]  # group id -> row positions, groups of 2 or more
    outlier_model: OutlierModel | None
    scores: np.ndarray  # outlier score per row (nan when unreadable)
    conversions: Counter
    timings: dict[str, float]
    near_pairs: list[dict] = field(default_factory=list)  # row positions a, b, how found, similarity, turn
    near_looks: dict = field(default_factory=dict)  # how many pairs reached each look of the similarity search

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)


def summarise(curation: Curation) -> dict:
    statuses = Counter(row["status"] for row in curation.rows)
    splits = Counter(row["split"] for row in curation.rows if row["status"] == "keep")
    return {
        "input": str(curation.source.root),
        "format": curation.source.kind,
        "items": len(curation.rows),
        "statuses": {s: statuses.get(s, 0) for s in STATUSES},
        "duplicate_groups": len(curation.groups),
        "label_conflict_groups": len({r["group"] for r in curation.rows if r["status"] == "label_conflict"}),
        "contaminant_groups": len({r["group"] if r["group"] != "" else f"i{r['index']}" for r in curation.rows if r["status"] == "outlier"}),
        "near_duplicate_pairs": {how: sum(p["how"] == how for p in curation.near_pairs) for how in ("hashes", "aligned")},
        "splits": {split: splits.get(split, 0) for split in SPLITS},
        "conversions": dict(curation.conversions),
        "timings_s": {k: round(v, 2) for k, v in curation.timings.items()},
    }
