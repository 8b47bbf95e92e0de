"""Robustness: accuracy under twelve corruption families at five severities."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..data import corruptions as corruption_module
from ..data import load_item
from ..data.sources import Source
from ..inference import Predictor
from .scoring import backend_logits


def corruption_accuracy(predictor: Predictor, source: Source, paths: list[str], labels: np.ndarray, seed: int = 0,
                        families: list[str] | None = None, limit: int | None = None, tta: bool = False) -> dict:
    """Accuracy per family and severity on ``paths`` of ``source`` (a seeded subset of ``limit`` images)."""
    table: dict[str, dict[str, float]] = {}
    items = {item.path: item for item in source.items}
    subset = np.arange(len(paths))
    if limit is not None and limit < len(paths):
        subset = np.sort(np.random.default_rng(seed).choice(len(paths), limit, replace=False))
    originals = [load_item(source, items[paths[i]])[0] for i in subset]
    subset_labels = labels[subset]

    def corrupted_batch(pool, family: str, severity: int) -> torch.Tensor:
        # Each image's corruption is seeded by its index, so the pool's order changes nothing;
        # NumPy, SciPy and Pillow release the GIL for most of corrupting and framing.
        def one(k: int) -> np.ndarray:
            return predictor.prepare(corruption_module.corrupt(originals[k], family, severity, seed + k))

        corrupted = np.stack(list(pool.map(one, range(len(originals)), chunksize=32)))
        return torch.from_numpy(corrupted).permute(0, 3, 1, 2).contiguous()

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for family in families or list(corruption_module.CORRUPTIONS):
            table[family] = {}
            for severity in corruption_module.SEVERITIES:
                pred = backend_logits(predictor, corrupted_batch(pool, family, severity), tta=tta).argmax(1).numpy()
                table[family][str(severity)] = float((pred == subset_labels).mean())
    means = {f: float(np.mean(list(v.values()))) for f, v in table.items()}
    return {"accuracy": table, "family_mean": means,
            "mean": float(np.mean([v for f in table.values() for v in f.values()])),
            "seed": seed, "images": int(len(subset))}
