"""Batch prediction over files, folders and .npz files, and the differential count."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..core.classes import TO_CHECK_FOLDER, WHITE_CELLS
from ..core.errors import BloodcellError, ImageReadError
from ..data import IMAGE_EXTENSIONS, load_item, open_source
from ..data.pipeline import Preparer, usable_cores, warm_up
from ..models.ood import OOD_THRESHOLD, batch_shift
from .predictor import Predictor


def folder_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, hidden files left out), in the order of their paths' parts.

    The order ``sorted(folder.rglob("*"))`` gives, from ``os.walk``'s directory entries
    (no ``stat`` per file, no Path per comparison: a tenth of the time on 15,000 files).
    """
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, name) for name in names
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                  and os.path.isfile(os.path.join(root, name))]
    return sorted(found, key=lambda name: name.split(os.sep))


def collect_inputs(paths: Iterable[str | Path]) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """Expand files, folders (recursive) and .npz files into items to predict; list what was refused."""
    items: list[tuple[str, object]] = []
    bad: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            bad.append((str(path), "no such file or folder"))
        elif path.is_dir():
            items += [(name, Path(name)) for name in folder_images(path)]
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


# Below this many images, worker processes cost more to start than they save.
POOL_FROM_IMAGES = 1024


def boot_workers_for(paths: list[Path], workers: int | None) -> None:
    """Start the decoding workers' fork server now when a job on ``paths`` may use workers.

    It boots in the background (~0.3 s), so callers call this before slow steps of their own
    (listing folders, loading the model). A job that turns out small still runs in-process.
    """
    if workers or (workers is None and (len(paths) >= POOL_FROM_IMAGES or any(p.is_dir() for p in paths))):
        warm_up()


def predict_paths(predictor: Predictor, paths: Iterable[str | Path], batch_size: int = 64, workers: int | None = None,
                  abstain_below: float = 0.0, progress: Callable[[int], None] | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Predict every readable image under ``paths``; returns (rows, [(path, reason) refused]).

    Decoding and preprocessing run on ``workers`` processes (None: one per core, for jobs of
    at least ``POOL_FROM_IMAGES`` images; 0: in this process) while the network runs on the
    batches already prepared (bloodcell.data.pipeline). Answers are the same either way.
    """
    paths = [Path(p) for p in paths]
    boot_workers_for(paths, workers)  # while the folders are listed
    items, bad = collect_inputs(paths)
    if workers is None:
        workers = usable_cores() if len(items) >= POOL_FROM_IMAGES else 0
    rows: list[dict] = []

    def chunk(start: int) -> tuple[list[str], list]:
        """Names and entries of a chunk: files go to the workers as paths, .npz items (in memory) as arrays."""
        names, entries = [], []
        for name, entry in items[start : start + batch_size]:
            if isinstance(entry, tuple):
                try:
                    entry = load_item(*entry)[0]
                except (ImageReadError, BloodcellError) as exc:
                    bad.append((name, str(exc)))
                    continue
            names.append(name)
            entries.append(entry if isinstance(entry, np.ndarray) else str(entry))
        return names, entries

    work = [chunk(start) for start in range(0, len(items), batch_size)]
    with Preparer(predictor.image_size, predictor.framing, workers) as preparer:
        for (names, _), prepared in zip(work, preparer.map(entries for _, entries in work)):
            bad += [(names[position], reason) for position, reason in prepared.failed]
            probs, ood = predictor.prepared_scores(prepared.batch)
            for row, position in enumerate(prepared.kept):
                rows.append(prediction_row(names[position], probs[row], predictor.class_names, abstain_below,
                                           None if ood is None else float(ood[row])))
            if progress:
                progress(len(names))
    return rows, bad


def prediction_row(name: str, probs: np.ndarray, class_names: list[str], abstain_below: float,
                   ood_score: float | None) -> dict:
    """One image's answer: class, confidence, whether a person should check it, and why.

    ``abstained``: below ``abstain_below`` confidence. ``out_of_distribution``: the image lies
    farther from the training lab's images than 99% of that lab's own (score above 1); empty
    when the model carries no such statistics. Either one sends the cell to "to check".
    """
    values = probs.tolist()
    confidence = max(values)
    row = {"path": name, "pred": class_names[values.index(confidence)], "confidence": round(confidence, 6),
           "abstained": confidence < abstain_below}
    if ood_score is not None:
        row["ood_score"] = round(ood_score, 4)
        row["out_of_distribution"] = bool(ood_score > OOD_THRESHOLD)
    return {**row, **{c: round(p, 6) for c, p in zip(class_names, values)}}


def to_check(row: dict) -> bool:
    """A cell a person should look at: low confidence or unlike the training lab's cells."""
    return bool(row["abstained"] or row.get("out_of_distribution"))


def shift_summary(rows: list[dict]) -> dict | None:
    """The batch's out-of-distribution verdict (bloodcell.models.batch_shift), or None without scores."""
    scores = [r["ood_score"] for r in rows if "ood_score" in r]
    return batch_shift(np.array(scores)) if scores else None


# A manual differential counts 100 white cells; fewer give wide intervals (see percent_intervals).
DIFFERENTIAL_CELLS = 100


def percent_intervals(counts: list[int], total: int, level: float = 0.95) -> list[list[float] | None]:
    """The exact (Clopper-Pearson) interval of each share ``count / total``, in percent, rounded to 0.1.

    How far a differential of ``total`` cells may lie from the slide's own from counting alone, as
    in Rümke's table; the classifier's own errors come on top. None where nothing was counted.
    What ``scipy.stats.binomtest(...).proportion_ci(method="exact")`` gives (tested), from the beta
    quantiles in one call: that one costs milliseconds per share, too slow for every request of
    the service.
    """
    if total <= 0:
        return [None] * len(counts)
    from scipy.special import betaincinv

    k = np.asarray(counts, dtype=np.float64)
    tail = (1 - level) / 2
    with np.errstate(all="ignore"):  # the bounds at k = 0 and k = total are set below
        low = np.where(k > 0, betaincinv(k, total - k + 1, tail), 0.0)
        high = np.where(k < total, betaincinv(k + 1, total - k, 1 - tail), 1.0)
    return [[round(100 * float(a), 1), round(100 * float(b), 1)] for a, b in zip(low, high)]


def differential_count(rows: list[dict], include_abstained: bool = False) -> dict:
    """A hematologist's differential: white cells as percentages of white cells; platelets and erythroblasts apart.

    Cells to check (low confidence or out of distribution) are left out of the count unless
    ``include_abstained``. ``white_cell_percent_95``: each percentage's 95% interval from
    counting alone (:func:`percent_intervals`), None for a type when no white cell was counted."""
    counts = Counter(r["pred"] for r in rows if include_abstained or not to_check(r))
    white = sum(counts.get(c, 0) for c in WHITE_CELLS)
    return {
        "white_cells": white,
        "white_cell_percent": {c: round(100 * counts.get(c, 0) / white, 1) if white else 0.0 for c in WHITE_CELLS},
        "white_cell_percent_95": dict(zip(WHITE_CELLS, percent_intervals([counts.get(c, 0) for c in WHITE_CELLS], white))),
        "platelets": counts.get("platelet", 0),
        "erythroblasts": counts.get("erythroblast", 0),
        "erythroblasts_per_100_white_cells": round(100 * counts.get("erythroblast", 0) / white, 1) if white else None,
        "abstained": sum(1 for r in rows if r["abstained"]),
        "out_of_distribution": sum(1 for r in rows if r.get("out_of_distribution")),
        "to_check": sum(1 for r in rows if to_check(r)),
        "counts": dict(counts),
    }


def write_predictions(rows: list[dict], class_names: list[str], out: Path, fmt: str = "csv") -> None:
    if fmt == "json":
        out.write_text(json.dumps(rows, indent=1))
        return
    with open(out, "w", newline="") as handle:
        shift = ["ood_score", "out_of_distribution"] if rows and "ood_score" in rows[0] else []
        writer = csv.DictWriter(handle, fieldnames=["path", "pred", "confidence", "abstained", *shift, *class_names])
        writer.writeheader()
        writer.writerows(rows)


def sort_for_review(rows: list[dict], paths: Iterable[str | Path], dest: str | Path) -> dict[str, int]:
    """Copy each predicted image into ``dest/<predicted class>/``, or ``dest/to_check/`` when it is to
    check (abstained or out of distribution), for a person to review; returns files per folder.

    The images are copied, never moved (an array of an .npz file is written as PNG), and a name
    already taken in a folder gets a number: nothing in ``dest`` is overwritten. A reviewed
    folder is what ``bloodcell adapt --data`` reads (it leaves ``to_check/`` out)."""
    import shutil

    from PIL import Image

    entries = dict(collect_inputs(paths)[0])
    dest = Path(dest)
    written: Counter = Counter()
    for row in rows:
        folder = TO_CHECK_FOLDER if to_check(row) else row["pred"]
        target_dir = dest / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        entry = entries.get(row["path"])
        if isinstance(entry, Path):
            name = entry.name
        else:  # an array of an .npz file: 'file.npz::images[3]' -> file-images-3.png
            name = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(row["path"]).name).strip("-") + ".png"
        target = target_dir / name
        n = 1
        while target.exists():
            n += 1
            target = target_dir / f"{Path(name).stem}-{n}{Path(name).suffix}"
        if isinstance(entry, Path):
            shutil.copy2(entry, target)
        elif entry is not None:
            Image.fromarray(load_item(*entry)[0]).save(target)
        else:
            continue
        written[folder] += 1
    return dict(written)

