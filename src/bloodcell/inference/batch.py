"""Batch prediction over files, folders and .npz files, and the differential count."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..core.classes import WHITE_CELLS
from ..core.errors import BloodcellError, ImageReadError
from ..data import IMAGE_EXTENSIONS, decode_file, load_item, open_source
from .predictor import Predictor


def collect_inputs(paths: Iterable[str | Path]) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """Expand files, folders (recursive) and .npz files into items to predict; list what was refused."""
    items: list[tuple[str, object]] = []
    bad: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            bad.append((str(path), "no such file or folder"))
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                if file.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append((str(file), file))
        elif path.suffix.lower() == ".npz":
            try:
                source = open_source(path)
            except BloodcellError as exc:
                bad.append((str(path), str(exc)))
                continue
            items += [(item.path, (source, item)) for item in source.items]
        else:
            items.append((str(path), path))
    return items, bad


def _decode(entry) -> np.ndarray:
    if isinstance(entry, tuple):
        return load_item(*entry)[0]
    return decode_file(entry)[0]


def predict_paths(predictor: Predictor, paths: Iterable[str | Path], batch_size: int = 64, workers: int = 2,
                  abstain_below: float = 0.0, progress: Callable[[int], None] | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Predict every readable image under ``paths``; returns (rows, [(path, reason) refused])."""
    items, bad = collect_inputs(paths)
    rows: list[dict] = []

    def load(entry):
        try:
            return _decode(entry)
        except (ImageReadError, BloodcellError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            decoded = list(pool.map(load, [entry for _, entry in chunk]))
            good = [(name, image) for (name, _), image in zip(chunk, decoded) if not isinstance(image, Exception)]
            bad += [(name, str(image)) for (name, _), image in zip(chunk, decoded) if isinstance(image, Exception)]
            probs = predictor.probabilities([image for _, image in good])
            for (name, _), row in zip(good, probs):
                confidence = float(row.max())
                rows.append({"path": name, "pred": predictor.class_names[int(row.argmax())],
                             "confidence": round(confidence, 6), "abstained": confidence < abstain_below,
                             **{c: round(float(p), 6) for c, p in zip(predictor.class_names, row)}})
            if progress:
                progress(len(chunk))
    return rows, bad


def differential_count(rows: list[dict], include_abstained: bool = False) -> dict:
    """A hematologist's differential: white cells as percentages of white cells; platelets and erythroblasts apart."""
    counts = Counter(r["pred"] for r in rows if include_abstained or not r["abstained"])
    white = sum(counts.get(c, 0) for c in WHITE_CELLS)
    return {
        "white_cells": white,
        "white_cell_percent": {c: round(100 * counts.get(c, 0) / white, 1) if white else 0.0 for c in WHITE_CELLS},
        "platelets": counts.get("platelet", 0),
        "erythroblasts": counts.get("erythroblast", 0),
        "erythroblasts_per_100_white_cells": round(100 * counts.get("erythroblast", 0) / white, 1) if white else None,
        "abstained": sum(1 for r in rows if r["abstained"]),
        "counts": dict(counts),
    }


def write_predictions(rows: list[dict], class_names: list[str], out: Path, fmt: str = "csv") -> None:
    if fmt == "json":
        out.write_text(json.dumps(rows, indent=1))
        return
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "pred", "confidence", "abstained", *class_names])
        writer.writeheader()
        writer.writerows(rows)
