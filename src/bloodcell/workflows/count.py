"""``bloodcell count``: whole fields in, every cell found, white cells typed, counts and overlays out.

Writes into OUT (created; the fields themselves are never changed):

- ``cells.csv``: one row per cell: ``image,kind,x0,y0,x1,y1,score,class,confidence`` (boxes in
  the field's own pixels; class and confidence for white cells only), then ``ood_score``,
  ``to_check`` and ``cut_by_edge`` (a white cell partly outside the photograph: typed, but to check);
- ``counts.csv``: one row per field: its slide, white cells by class, red cells, platelets, cells
  to check;
- ``slides.csv``: one row per slide (the folder holding its fields): fields, white cells counted
  and to check, each white-cell type's count, percentage and 95% interval from counting alone,
  erythroblasts, red cells and platelets;
- ``summary.json``: the run's differential and totals, each slide's, the fields skipped with a
  reason, and the fields read on magnified tiles (taken at a lower magnification than the
  detector's training fields) with the magnification;
- ``overlays/<image>.png``: each field with its boxes and labels drawn;
- ``report.html`` (``report``): each slide's differential with its intervals, what to look at first,
  and its white cells as thumbnails grouped by class (:mod:`bloodcell.workflows.count_report`);
- with ``crops``, ``crops/<class>/<image>-<n>.png``: each white cell cut out as the classifier saw
  it, in the folder of its class, or in ``crops/to_check/``. A lab reviews them as it would on an
  analyser (moves a wrong cell to its class's folder, sorts the cells to check, deletes what it
  cannot tell), and ``bloodcell adapt --data OUT/crops`` then learns from its own cells. The
  ``crop`` column of cells.csv names each cell's file.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..core.classes import TO_CHECK_FOLDER, WHITE_CELLS
from ..core.errors import BloodcellError, ImageReadError
from ..inference.batch import collect_inputs
from ..inference.count import (
    CROP_CONTEXT,
    FieldCounter,
    FieldResult,
    draw_overlay,
    run_differential,
    slide_differentials,
    slide_of,
)
from ..inference.detect import load_detector
from ..inference.predictor import load_predictor
from .count_report import Gallery, write_count_report

CELL_COLUMNS = ["image", "kind", "x0", "y0", "x1", "y1", "score", "class", "confidence", "ood_score", "to_check",
                "cut_by_edge", "crop"]
SLIDE_TOTALS = ("slide", "fields", "fields_without_white_cells", "white_cell_boxes", "white_cells", "to_check")
SLIDE_COLUMNS = [*SLIDE_TOTALS, *(f"{name}{suffix}" for name in WHITE_CELLS for suffix in ("", "_percent", "_low95", "_high95")),
                 "erythroblasts", "red_cells", "platelets"]


def slide_row(slide: dict) -> dict:
    """A row of slides.csv from one of :func:`slide_differentials`' entries."""
    row = {key: slide[key] for key in (*SLIDE_TOTALS, "erythroblasts", "red_cells", "platelets")}
    for name in WHITE_CELLS:
        interval = slide["white_cell_percent_95"][name]
        row.update({name: slide["counts"].get(name, 0), f"{name}_percent": slide["white_cell_percent"][name],
                    f"{name}_low95": interval[0] if interval else "", f"{name}_high95": interval[1] if interval else ""})
    return row


def overlay_name(name: str, taken: set[str]) -> str:
    """A file name for a field's overlay, unique within the run (fields from two folders may share a name)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem) or "field"
    candidate, n = f"{stem}.png", 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}-{n}.png"
    taken.add(candidate)
    return candidate


def save_crops(result: FieldResult, root: Path, stem: str, pool: ThreadPoolExecutor) -> None:
    """Write ``result``'s white cells under ``root/<class or to_check>/<stem>-<n>.png``; each row gets its ``crop``."""
    from PIL import Image

    for n, (cell, crop) in enumerate(zip(result.white_cells, result.crops), start=1):
        folder = TO_CHECK_FOLDER if cell["to_check"] else cell["class"]
        (root / folder).mkdir(parents=True, exist_ok=True)
        cell["crop"] = f"crops/{folder}/{stem}-{n}.png"
        pool.submit(Image.fromarray(crop).save, root / folder / f"{stem}-{n}.png")


def count_fields(paths: Iterable[str | Path], out: str | Path, model: str | Path = "default",
                 detector: str | Path = "default", abstain_below: float = 0.7, batch_size: int = 8,
                 workers: int = 2, overlays: bool = True, context: float = CROP_CONTEXT,
                 progress_factory: Callable[[int], Callable[[int], None]] | None = None, crops: bool = False,
                 report: bool = True) -> dict:
    """Count every field under ``paths`` (files and folders, recursive); returns the summary written to OUT.

    ``progress_factory``: called once with the number of fields found; what it returns is called
    with the number of fields done after each batch.
    """
    from ..data import decode_file

    items, bad, slides = [], [], {}
    for path in paths:  # one argument at a time, so that each field's slide is named from the folder given
        found, refused = collect_inputs([path])
        items += found
        bad += refused
        slides.update((name, slide_of(path, name)) for name, _ in found)
    bad += [(name, "an array in an .npz file, not a field's image file") for name, entry in items if isinstance(entry, tuple)]
    items = [(name, entry) for name, entry in items if not isinstance(entry, tuple)]
    if not items:  # before OUT is made: nothing to count leaves nothing behind
        names = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise BloodcellError(f"no field image found in {names}" + (f" ({len(bad)} refused: {bad[0][0]}: {bad[0][1]})" if bad else ""))
    counter = FieldCounter(load_detector(detector), load_predictor(model), abstain_below, context)
    progress = progress_factory(len(items)) if progress_factory else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if overlays:
        (out / "overlays").mkdir(exist_ok=True)

    def load(entry):
        try:
            return decode_file(entry)[0]
        except (ImageReadError, BloodcellError) as exc:
            return exc

    results: list[FieldResult] = []
    gallery = Gallery()
    taken: set[str] = set()
    crop_stems: set[str] = set()
    with open(out / "cells.csv", "w", newline="") as cells_file, open(out / "counts.csv", "w", newline="") as counts_file, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        cells_writer = csv.DictWriter(cells_file, fieldnames=CELL_COLUMNS, restval="")
        cells_writer.writeheader()
        counts_writer = csv.DictWriter(counts_file, fieldnames=["image", "slide", "white_cells", *counter.class_names,
                                                                "red_cells", "platelets", "to_check"])
        counts_writer.writeheader()
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            decoded = list(pool.map(load, [entry for _, entry in chunk]))
            good = [(name, image) for (name, _), image in zip(chunk, decoded) if not isinstance(image, Exception)]
            bad += [(name, str(image)) for (name, _), image in zip(chunk, decoded) if isinstance(image, Exception)]
            if good:
                batch = counter.count([image for _, image in good], [name for name, _ in good], keep_crops=crops or report)
                for (_, image), result in zip(good, batch):
                    result.slide = slides[result.name]
                    if report:
                        for cell, crop in zip(result.white_cells, result.crops):
                            gallery.add(result.slide, cell, crop, result.name)
                    if crops:
                        save_crops(result, out / "crops", Path(overlay_name(result.name, crop_stems)).stem, pool)
                    result.crops = []  # a run may hold thousands of fields
                    cells_writer.writerows({"image": result.name, **cell} for cell in result.cells)
                    counts_writer.writerow({"slide": result.slide, **result.counts(counter.class_names)})
                    if overlays:
                        target = out / "overlays" / overlay_name(result.name, taken)
                        pool.submit(lambda im=image, r=result, t=target: draw_overlay(im, r).save(t))
                results += batch
            if progress:
                progress(len(chunk))
    if not results:
        raise BloodcellError("no field could be read" + (f" ({len(bad)} refused: {bad[0][0]}: {bad[0][1]})" if bad else ""))
    by_slide = slide_differentials(results)
    with open(out / "slides.csv", "w", newline="") as slides_file:
        writer = csv.DictWriter(slides_file, fieldnames=SLIDE_COLUMNS)
        writer.writeheader()
        writer.writerows(slide_row(slide) for slide in by_slide)
    summary = {
        "differential": run_differential(results),
        "slides": by_slide,
        "model": str(model),
        "detector": str(detector),
        "crop_context": context,
        "abstain_below": abstain_below,
        "skipped": [{"image": name, "reason": reason} for name, reason in bad],
        "magnified": [{"image": r.name, "magnification": r.magnification} for r in results if r.magnification > 1],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if report:
        write_count_report(out, summary, gallery)
    return summary
