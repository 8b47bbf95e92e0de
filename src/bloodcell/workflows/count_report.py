"""``OUT/report.html`` of a ``bloodcell count`` run: one self-contained page a lab can read, print or mail.

Each slide's differential with its 95% intervals, red cells and platelets, what to look at first
(cells to check, shift, thin counts), and its white cells as thumbnails grouped by the class
they were given, the cells to check apart, so a person can look the answers over.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..core.classes import TO_CHECK_FOLDER, WHITE_CELLS
from ..core.html import esc, page, table, thumbnail_uri
from ..inference.batch import DIFFERENTIAL_CELLS
from ..inference.count import mostly_to_check

# Thumbnails kept per slide and class: enough to look a class over; the rest are in crops/ with --crops.
THUMBNAILS_PER_CLASS = 48


class Gallery:
    """The white cells' thumbnails, per slide and per class (or to check), at most ``limit`` of each."""

    def __init__(self, limit: int = THUMBNAILS_PER_CLASS):
        self.limit = limit
        self.cells: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
        self.total: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, slide: str, cell: dict, crop: np.ndarray, field: str) -> None:
        group = TO_CHECK_FOLDER if cell["to_check"] else cell["class"]
        self.total[slide][group] += 1
        if len(self.cells[slide][group]) < self.limit:
            answer = f" {cell['class']}" if cell["to_check"] else ""  # the class it was given, where not shown by its group
            caption = f"{Path(field).name}{answer} {float(cell['confidence']):.2f}"
            self.cells[slide][group].append((thumbnail_uri(crop, 96), caption))


def _slide_section(slide: dict, gallery: Gallery) -> str:
    name = slide["slide"]
    rows = []
    for cell_type in WHITE_CELLS:
        interval = slide["white_cell_percent_95"][cell_type]
        rows.append([cell_type, slide["counts"].get(cell_type, 0), f"{slide['white_cell_percent'][cell_type]:.1f}",
                     "" if interval is None else f"{interval[0]:.1f}-{interval[1]:.1f}"])
    per_100 = slide.get("erythroblasts_per_100_white_cells")
    parts = [f"<h2>Slide {esc(name)}</h2>",
             f"<p>{slide['fields']} field(s), {slide['white_cell_boxes']} white cells found: {slide['white_cells']} "
             f"counted, {slide['to_check']} to check; {slide['red_cells']} red cells, {slide['platelets']} platelets; "
             f"erythroblasts {slide['erythroblasts']}" + (f" ({per_100} per 100 white cells)" if per_100 is not None else "")
             + f"; {slide['fields_without_white_cells']} field(s) without white cells.</p>"]
    notes = []
    if 0 < slide["white_cells"] < DIFFERENTIAL_CELLS:
        notes.append(f"Counted on {slide['white_cells']} white cells, fewer than the {DIFFERENTIAL_CELLS} of a "
                     "manual differential: read each percentage with its interval.")
    if mostly_to_check(slide):
        notes.append(f"{slide['to_check']} of {slide['white_cell_boxes']} white cells are to check: these fields do "
                     "not look like the lab the classifier was trained on. Check them, or adapt the model "
                     "(<code>bloodcell adapt</code>).")
    parts += [f"<p class='bad'>{note}</p>" for note in notes]
    parts.append(table(["white cell type", "counted", "% of counted", "95% interval"], rows, numeric={1, 2, 3}))
    groups = [g for g in (*WHITE_CELLS, "erythroblast", "platelet", TO_CHECK_FOLDER) if gallery.total[name].get(g)]
    for group in groups:
        shown, total = gallery.cells[name][group], gallery.total[name][group]
        title = "to check (unsure, unlike the training lab's cells, or called a platelet)" if group == TO_CHECK_FOLDER else group
        more = f" (the first {len(shown)} shown)" if total > len(shown) else ""
        figures = "".join(f"<figure><img src='{uri}' alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure>"
                          for uri, caption in shown)
        parts.append(f"<div class='group'><b>{esc(title)}</b>: {total}{more}<div class='thumbs'>{figures}</div></div>")
    return "".join(parts)


def write_count_report(out: Path, summary: dict, gallery: Gallery) -> Path:
    """Write ``out/report.html`` from a count run's ``summary`` (as summary.json holds it) and its thumbnails."""
    diff = summary["differential"]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [(f"<h1>Count report</h1><p class='muted'>{esc(when)}; classifier {esc(summary['model'])}, "
              f"detector {esc(summary['detector'])}; white cells below {summary['abstain_below']} confidence are to "
              "check. Not a medical device: a person reviews the result.</p>"),
             (f"<p>{diff['fields']} field(s) in {len(summary['slides'])} slide(s): {diff['white_cell_boxes']} white cells "
              f"({diff['white_cells']} counted, {diff['to_check']} to check), {diff['red_cells']} red cells, "
              f"{diff['platelets']} platelets.</p>")]
    if summary["skipped"]:
        parts.append("<p class='bad'>Skipped: " + "; ".join(f"{esc(s['image'])} ({esc(s['reason'])})"
                                                          for s in summary["skipped"]) + "</p>")
    if summary["magnified"]:
        parts.append(f"<p class='muted'>{len(summary['magnified'])} field(s) were taken at a lower magnification than "
                     "the detector's training fields and were read on magnified tiles (summary.json lists them).</p>")
    if len(summary["slides"]) > 1:
        rows = [[esc(s["slide"]), s["fields"], s["white_cells"], s["to_check"],
                 *(f"{s['white_cell_percent'][t]:.1f}" for t in WHITE_CELLS)] for s in summary["slides"]]
        parts.append("<h2>Slides side by side (% of counted white cells)</h2>"
                     + table(["slide", "fields", "counted", "to check", *WHITE_CELLS], rows, numeric=set(range(1, 10))))
    parts += [_slide_section(slide, gallery) for slide in summary["slides"]]
    parts.append("<h2>How to read it</h2><p class='muted'>Each percentage's 95% interval is the exact binomial "
                 "(Clopper-Pearson) interval from counting alone, as Rümke's table gives it for a manual count: where "
                 "the slide's own share may lie, given how many cells were counted. The classifier's own mistakes come "
                 "on top, and cells to check are left out of the count until a person types them. Files: cells.csv "
                 "(every cell), counts.csv (every field), slides.csv (every slide), overlays/ (the boxes drawn).</p>")
    path = out / "report.html"
    path.write_text(page("bloodcell count report", "".join(parts)))
    return path
