"""Teachers for knowledge distillation: trained models score every training image once.

The targets file is safetensors (no pickle): a ``probabilities`` tensor (N x C) and, in its
metadata, the class names, the teachers and each row's image key: the image's path inside
its split folder (``neutrophil/SNE_1234.jpg``), or its array entry for ``.npz`` data. So a
file made from one `bloodcell curate` output fits any other output of the same curation.
The loss that uses it is :mod:`bloodcell.training.distill`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..core.errors import BloodcellError
from ..data import Item, Source, iter_batches
from .predictor import load_predictor


def item_key(source: Source, item: Item) -> str:
    """An image's name inside its split: the path under the split folder, or the npz array entry."""
    return path_key(source.root, item.path)


def path_key(root: Path, path: str) -> str:
    if "::" in path:
        return path.rpartition("::")[2]
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def teacher_targets(teachers: Sequence[str | Path], source: Source, class_names: list[str] | None = None,
                    chunk: int = 256, on_chunk: Callable[[int], None] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """The mean of the teachers' calibrated class probabilities on every readable image of ``source``.

    Each teacher sees the image through its own recorded preprocessing (size, framing), so
    teachers trained differently can be averaged. Returns (keys, probabilities, class names).
    """
    if not teachers:
        raise BloodcellError("distillation needs at least one teacher model")
    predictors = [load_predictor(t) for t in teachers]
    names = class_names or predictors[0].class_names
    for predictor in predictors:
        if sorted(predictor.class_names) != sorted(names):
            raise BloodcellError(f"{predictor.source}: classes {predictor.class_names} differ from {names}")
    order = [[p.class_names.index(c) for c in names] for p in predictors]
    keys, rows = [], []
    for batch in iter_batches(source, chunk):  # unreadable files are skipped, as training skips them
        images = batch.images
        if not images:
            continue
        chunk_keys = [item_key(source, item) for item in batch.items]
        total = np.zeros((len(images), len(names)), dtype=np.float64)
        prepared: dict[str, np.ndarray] = {}  # teachers with the same preprocessing share the resized batch
        for predictor, columns in zip(predictors, order):
            contract = json.dumps([predictor.image_size, predictor.framing], sort_keys=True)
            if contract not in prepared:
                prepared[contract] = predictor.prepare_batch(images)
            total += predictor.prepared_probabilities(prepared[contract])[:, columns]
        keys += chunk_keys
        rows.append(total / len(predictors))
        if on_chunk:
            on_chunk(len(images))
    if not rows:
        raise BloodcellError(f"{source.root}: no readable images to score")
    return keys, np.concatenate(rows).astype(np.float32), list(names)


def label_disagreements(source: Source, keys: list[str], probabilities: np.ndarray, class_names: list[str]) -> list[dict]:
    """The scored images whose teachers' most probable class is not their label, most confident first:
    on images the teachers were trained on, these are the labels worth a second look."""
    label_of = {item_key(source, item): source.class_names[item.label] for item in source.items if item.label is not None}
    rows = [{"image": key, "label": label_of.get(key), "teachers": class_names[int(row.argmax())],
             "probability": round(float(row.max()), 4)}
            for key, row in zip(keys, probabilities) if class_names[int(row.argmax())] != label_of.get(key)]
    return sorted(rows, key=lambda r: -r["probability"])


def write_disagreements(path: str | Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "teachers", "probability"])
        writer.writeheader()
        writer.writerows(rows)


def save_targets(path: str | Path, keys: list[str], probabilities: np.ndarray, class_names: list[str],
                 teachers: Sequence[str | Path] = ()) -> None:
    from safetensors.numpy import save_file

    if len(keys) != len(probabilities) or len(set(keys)) != len(keys):
        raise BloodcellError(f"{path}: {len(keys)} keys (some repeated?) for {len(probabilities)} rows")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"probabilities": np.ascontiguousarray(probabilities, dtype=np.float32)}, str(path), metadata={
        "bloodcell_distill": json.dumps({"keys": keys, "class_names": class_names, "teachers": [str(t) for t in teachers]})})


def load_targets(path: str | Path) -> tuple[dict[str, np.ndarray], list[str], dict]:
    """(key -> probabilities, class names, the file's metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BloodcellError(f"{path}: distillation targets not found (make them with `bloodcell distill-targets`)")
    try:
        with safe_open(str(path), "np") as handle:
            meta = json.loads((handle.metadata() or {})["bloodcell_distill"])
            probabilities = handle.get_tensor("probabilities")
    except Exception as exc:  # noqa: BLE001
        raise BloodcellError(f"{path}: not a distillation targets file ({exc})") from None
    if probabilities.ndim != 2 or probabilities.shape != (len(meta["keys"]), len(meta["class_names"])):
        raise BloodcellError(f"{path}: probabilities of shape {probabilities.shape} do not fit "
                             f"{len(meta['keys'])} images x {len(meta['class_names'])} classes")
    return dict(zip(meta["keys"], probabilities)), meta["class_names"], meta
