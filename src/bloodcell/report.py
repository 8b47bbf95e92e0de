"""Self-contained HTML reports: every figure and thumbnail is embedded, so the
file opens offline in any browser and can be mailed as it is."""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .curate import Curation

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #ddd;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem} td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f4f4f4} .num{text-align:right} .muted{color:#666;font-size:.9rem}
.group{border:1px solid #ddd;border-radius:6px;padding:.5rem;margin:.6rem 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:8px} .cards .group{margin:0;font-size:.85rem}
.thumbs{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;text-align:center;font-size:.75rem;width:96px}
figure img{width:96px;height:96px;object-fit:cover;border-radius:3px;display:block}
.bad{color:#a00} .tag{display:inline-block;background:#eef;border-radius:3px;padding:0 .3rem;margin-right:.2rem}
"""


def png_data_uri(fig) -> str:
    """Render a matplotlib figure as an embedded PNG and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail_uri(image: np.ndarray, size: int = 96) -> str:
    thumb = Image.fromarray(image)
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def esc(value) -> str:
    return html.escape(str(value))


def table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{esc(c)}</td>" if j in numeric else f"<td>{c}</td>" for j, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
        f"<body>{body}</body></html>"
    )


def _class_chart(curation: Curation) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = curation.source.class_names
    fig, ax = plt.subplots(figsize=(8, 3.4))
    bottom = np.zeros(len(names))
    for split, colour in zip(("train", "val", "test"), ("#4c72b0", "#dd8452", "#55a868")):
        counts = Counter(r["label"] for r in curation.rows if r["status"] == "keep" and r["split"] == split)
        values = np.array([counts.get(c, 0) for c in names])
        ax.bar(names, values, bottom=bottom, label=split, color=colour)
        bottom += values
    removed = Counter(r["label"] for r in curation.rows if r["status"] not in ("keep",) and r["label"])
    ax.bar(names, [removed.get(c, 0) for c in names], bottom=bottom, label="removed", color="#c44e52")
    ax.set_ylabel("images")
    ax.set_title("Images per class after curation")
    ax.legend(ncol=4, fontsize=8)
    ax.tick_params(axis="x", rotation=30)
    return png_data_uri(fig)


def _score_chart(curation: Curation) -> str | None:
    import matplotlib.pyplot as plt

    scores = curation.scores[np.isfinite(curation.scores)]
    if not len(scores):
        return None
    is_outlier = np.array([r["status"] == "outlier" for r in curation.rows if r["outlier_score"] != ""])
    fig, ax = plt.subplots(figsize=(8, 2.8))
    bins = np.linspace(min(scores.min(), -5), max(scores.max(), curation.config.outlier_mads * 1.5), 80)
    ax.hist(scores[~is_outlier[: len(scores)]] if len(is_outlier) == len(scores) else scores, bins=bins,
            color="#4c72b0", label="kept / duplicates")
    if len(is_outlier) == len(scores) and is_outlier.any():
        ax.hist(scores[is_outlier], bins=bins, color="#c44e52", label="contaminants")
    ax.axvline(curation.config.outlier_mads, color="k", linestyle="--", label=f"cut ({curation.config.outlier_mads:g} MADs)")
    ax.set_yscale("log")
    ax.set_xlabel("outlier score: MADs above the dataset's typical distance to its 50 nearest neighbours")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return png_data_uri(fig)


def write_curation_report(curation: Curation, summary: dict, path: Path, max_groups: int = 12) -> None:
    from .data import load_item

    source = curation.source
    items = {item.index: item for item in source.items}

    def thumb(row: dict) -> str:
        try:
            image = load_item(source, items[row["index"]])[0]
        except Exception:  # noqa: BLE001 - a report must not fail on a file that changed meanwhile
            return "<div class='bad'>unreadable</div>"
        return f"<img src='{thumbnail_uri(image)}' alt='{esc(Path(row['path']).name)}'>"

    def figure(row: dict, caption: str) -> str:
        return f"<figure>{thumb(row)}<figcaption>{esc(caption)}</figcaption></figure>"

    rows = curation.rows
    statuses = summary["statuses"]
    parts = [
        "<h1>Curation report</h1>",
        f"<p class='muted'>{esc(summary['input'])} ({esc(summary['format'])}), {summary['items']} items</p>",
        "<h2>Summary</h2>",
        table(["status", "items"], [[s, n] for s, n in statuses.items()], numeric={1}),
        f"<p>{summary['duplicate_groups']} duplicate groups, {summary['label_conflict_groups']} with conflicting labels, "
        f"{summary['contaminant_groups']} contaminants (counting a repeated picture once). "
        f"Near duplicates: dHash &le; {curation.config.near_dhash} and pHash &le; {curation.config.near_phash} bits of 64.</p>",
    ]
    parts += ["<h2>Classes</h2>", f"<img src='{_class_chart(curation)}' alt='class distribution'>"]
    weights_path = path.parent / "class_weights.json"
    if weights_path.exists():
        import json

        weights = json.loads(weights_path.read_text())
        parts.append(
            table(
                ["class", "kept", "train", "weight"],
                [[esc(c), k, t, f"{w:.3f}"] for c, k, t, w in zip(weights["class_names"], weights["kept_counts"],
                                                                   weights["train_counts"], weights["weights"])],
                numeric={1, 2, 3},
            )
            + f"<p>Imbalance (largest / smallest class): {weights['imbalance_ratio']}. "
            "Weights are n / (classes &times; n<sub>class</sub>) over the training split.</p>"
        )
    if summary["splits"]:
        parts.append("<p>Split: " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
                     + ". Every member of a duplicate group is assigned to the same split.</p>")

    parts.append("<h2>Contaminants and unusual images</h2>")
    chart = _score_chart(curation)
    if chart:
        parts.append(f"<img src='{chart}' alt='outlier scores'>")
    outlier_groups: dict = {}
    for row in rows:
        if row["status"] == "outlier":
            outlier_groups.setdefault(row["group"] if row["group"] != "" else f"i{row['index']}", []).append(row)
    if outlier_groups:
        ordered = sorted(outlier_groups.values(), key=len, reverse=True)
        cards = []
        for group_rows in ordered[:60]:
            labels = Counter(r["label"] for r in group_rows)
            caption = f"x{len(group_rows)}"
            cards.append(
                f"<div class='group'><div class='thumbs'>{figure(group_rows[0], caption)}<div>"
                f"<b>{len(group_rows)} cop{'y' if len(group_rows) == 1 else 'ies'}</b>, labels: "
                + ", ".join(f"<span class='tag'>{esc(k)} {v}</span>" for k, v in labels.most_common())
                + f"<br><span class='muted'>{esc(group_rows[0]['reason'])}</span><br>"
                f"<span class='muted'>{esc(group_rows[0]['path'])}</span></div></div></div>"
            )
        parts.append("<p>Images unlike the rest of the dataset (photos, blanks, noise, drawings, but also cells "
                     "stained or lit unlike the others) and pictures repeated many times. They are left out of the "
                     "cleaned data; the evidence is beside each, for a person to check.</p>")
        parts.append("<div class='cards'>" + "".join(cards) + "</div>")
        if len(ordered) > 60:
            parts.append(f"<p class='muted'>... and {len(ordered) - 60} more in manifest.csv (status outlier).</p>")
    else:
        parts.append("<p>No contaminants found.</p>")

    parts.append("<h2>Largest duplicate groups</h2>")
    groups = sorted(curation.groups.values(), key=len, reverse=True)
    if not groups:
        parts.append("<p>No duplicates found.</p>")
    for members in groups[:max_groups]:
        group_rows = [rows[k] for k in members]
        labels = Counter(r["label"] for r in group_rows)
        shown = "".join(figure(r, f"{r['label']} · {r['status']}") for r in group_rows[:8])
        parts.append(
            f"<div class='group'><b>{len(group_rows)} images</b>, status <span class='tag'>{esc(group_rows[0]['status'] if group_rows[0]['status'] != 'keep' else group_rows[1]['status'])}</span> labels: "
            + ", ".join(f"<span class='tag'>{esc(k)} {v}</span>" for k, v in labels.most_common())
            + f"<div class='thumbs'>{shown}</div></div>"
        )
    if len(groups) > max_groups:
        parts.append(f"<p class='muted'>{len(groups) - max_groups} more groups in manifest.csv (column group).</p>")

    conflicts = [r for r in rows if r["status"] == "label_conflict"]
    parts.append("<h2>Label conflicts</h2>")
    if conflicts:
        parts.append("<p>Copies of one picture carry different labels. They are left out of the cleaned data "
                     "for a person to decide.</p>")
        parts.append(table(["image", "path", "label", "group"],
                           [[thumb(r), esc(r["path"]), esc(r["label"]), r["group"]] for r in conflicts[:200]]))
    else:
        parts.append("<p>None.</p>")

    bad = [r for r in rows if r["status"] == "unreadable"]
    parts.append("<h2>Files that could not be used</h2>")
    parts.append(table(["path", "reason"], [[esc(r["path"]), esc(r["reason"])] for r in bad[:500]]) if bad else "<p>None.</p>")
    if len(bad) > 500:
        parts.append(f"<p class='muted'>{len(bad) - 500} more in manifest.csv.</p>")
    if summary["conversions"]:
        parts.append("<h3>Converted while reading</h3>")
        parts.append(table(["conversion", "images"], [[esc(k), v] for k, v in summary["conversions"].items()], numeric={1}))

    parts.append("<h2>Settings and timings</h2>")
    parts.append(table(["setting", "value"], [[esc(k), esc(v)] for k, v in curation.config.model_dump().items()]))
    parts.append(table(["step", "seconds"], [[esc(k), v] for k, v in summary["timings_s"].items()], numeric={1}))
    path.write_text(page("bloodcell curation report", "\n".join(parts)))


# ---------------------------------------------------------------- run report


def _file_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    kind = "png" if path.suffix == ".png" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def _img(path: Path, alt: str, width: str = "100%") -> str:
    uri = _file_uri(path)
    return f"<img src='{uri}' alt='{esc(alt)}' style='max-width:{width}'>" if uri else f"<p class='muted'>({esc(alt)} missing)</p>"


def _metric_rows(metrics: dict) -> list[list]:
    return [[k, f"{metrics[k]:.4f}"] for k in ("accuracy", "balanced_accuracy", "macro_f1", "top2_accuracy", "ece")]


def write_run_report(run_dir: Path, evaluation: dict, baseline: tuple[Path, dict] | None = None,
                     out: Path | None = None, worst: int = 16) -> Path:
    """One self-contained report.html for a trained and evaluated run.

    ``evaluation`` is what :func:`bloodcell.evaluate.evaluate_model` returned (its
    figures in ``evaluation_dir``); ``baseline`` an optional (run_dir, evaluation)
    shown beside it, e.g. the custom CNN before fine-tuning.
    """
    import csv
    import json

    import yaml

    run_dir = Path(run_dir)
    out = out or run_dir / "report.html"
    eval_dir = Path(evaluation["out"])
    meta = json.loads((run_dir / "model.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    names = meta["class_names"]
    parts = [f"<h1>Run report: {esc(meta['model'])} at {meta['image_size']} px</h1>",
             f"<p class='muted'>{esc(run_dir)}; evaluated on {esc(evaluation['data'])} "
             f"({evaluation['count']} images{'; classes present: ' + ', '.join(evaluation['classes_present']) if len(evaluation['classes_present']) < len(names) else ''})</p>"]

    # Data and curation.
    data_dir = Path(config["data"])
    summary_path = data_dir / "summary.json"
    parts.append("<h2>Data</h2>")
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        parts.append(table(["status", "items"], [[k, v] for k, v in summary["statuses"].items()], numeric={1}))
        parts.append(f"<p>Split: {', '.join(f'{k} {v}' for k, v in summary['splits'].items())}. "
                     f"Curation report: {esc(data_dir / 'report.html')}</p>")
    weights_path = data_dir / "class_weights.json"
    if weights_path.is_file():
        weights = json.loads(weights_path.read_text())
        parts.append(table(["class", "train images", "loss weight"],
                           [[esc(c), n, f"{w:.3f}"] for c, n, w in zip(weights["class_names"], weights["train_counts"], weights["weights"])],
                           numeric={1, 2}))

    # Training curves.
    parts.append("<h2>Training</h2><div style='display:flex;gap:8px;flex-wrap:wrap'>"
                 + _img(run_dir / "accuracy.png", "accuracy curve", "48%") + _img(run_dir / "loss.png", "loss curve", "48%")
                 + "</div>")
    if (run_dir / "metrics.csv").is_file():
        rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
        if rows:
            total = sum(float(r["images_per_s"]) > 0 for r in rows)
            parts.append(f"<p>{total} epochs over phases {', '.join(dict.fromkeys(r['phase'] for r in rows))}; "
                         f"best validation macro-F1 {max(float(r['val_macro_f1']) for r in rows):.4f}.</p>")

    # Metrics, side by side with the baseline.
    parts.append("<h2>Test metrics</h2>")
    header = ["metric", meta["model"]]
    metric_rows = _metric_rows(evaluation)
    if baseline:
        base_meta = json.loads((Path(baseline[0]) / "model.json").read_text())
        header.append(f"{base_meta['model']} (baseline)")
        for row, base in zip(metric_rows, _metric_rows(baseline[1])):
            row.append(base[1])
    parts.append(table(header, metric_rows, numeric={1, 2}))
    parts.append(f"<p>Temperature {evaluation['temperature']:.3f} (fitted on validation){'; test-time augmentation' if evaluation['tta'] else ''}.</p>")
    per_class = [[esc(c), f"{evaluation['per_class'][c]['precision']:.3f}", f"{evaluation['per_class'][c]['recall']:.3f}",
                  f"{evaluation['per_class'][c]['f1']:.3f}", evaluation['per_class'][c]['support']] for c in names]
    parts.append(table(["class", "precision", "recall", "F1", "support"], per_class, numeric={1, 2, 3, 4}))

    parts.append("<h2>Confusion matrices</h2>")
    if baseline:
        parts.append(f"<h3>Baseline: {esc(Path(baseline[0]).name)}</h3>" + _img(Path(baseline[1]["out"]) / "confusion_matrix.png", "baseline confusion matrix"))
        parts.append(f"<h3>This model: {esc(run_dir.name)}</h3>")
    parts.append(_img(eval_dir / "confusion_matrix.png", "confusion matrix"))

    parts.append("<h2>Calibration</h2>" + _img(eval_dir / "reliability.png", "reliability diagram", "420px"))
    if "abstain" in evaluation:
        parts.append(table(["confidence threshold", "coverage", "accuracy on covered"],
                           [[f"{r['threshold']:.2f}", f"{r['coverage']:.3f}", f"{r['accuracy']:.4f}"] for r in evaluation["abstain"]],
                           numeric={0, 1, 2}))

    if "corruptions" in evaluation:
        corr = evaluation["corruptions"]
        parts.append("<h2>Robustness</h2>" + _img(eval_dir / "corruptions.png", "accuracy under corruption", "640px"))
        parts.append(table(["family", "mean accuracy"], [[esc(f), f"{v:.4f}"] for f, v in corr["family_mean"].items()]
                           + [["<b>all</b>", f"{corr['mean']:.4f}"]], numeric={1}))

    # Worst-classified examples: confident mistakes first.
    predictions = list(csv.DictReader(open(eval_dir / "predictions.csv")))
    mistakes = sorted((r for r in predictions if r["label"] != r["pred"]), key=lambda r: -float(r["confidence"]))
    if mistakes:
        from .data import decode_file, load_item, open_source

        parts.append("<h2>Worst-classified examples</h2><div class='thumbs'>")
        sources: dict[str, dict] = {}  # an .npz is opened once, not once per image
        for row in mistakes[:worst]:
            try:
                if "::" in row["path"]:
                    file = row["path"].split("::")[0]
                    if file not in sources:
                        source = open_source(file)
                        sources[file] = {"source": source, "items": {i.path: i for i in source.items}}
                    entry = sources[file]
                    image = load_item(entry["source"], entry["items"][row["path"]])[0]
                else:
                    image = decode_file(row["path"])[0]
                thumb = f"<img src='{thumbnail_uri(image)}' alt='{esc(Path(row['path']).name)}'>"
            except Exception:  # noqa: BLE001 - a moved file must not break the report
                thumb = "<div class='bad'>missing</div>"
            parts.append(f"<figure>{thumb}<figcaption>{esc(row['label'])} &rarr; <b>{esc(row['pred'])}</b> "
                         f"{float(row['confidence']):.0%}</figcaption></figure>")
        parts.append("</div>")

    parts.append("<h2>Configuration</h2><pre>" + esc(yaml.safe_dump(config, sort_keys=False)) + "</pre>")
    out.write_text(page(f"bloodcell run report: {run_dir.name}", "\n".join(parts)))
    return out


def html_to_pdf(html_path: Path, timeout: float = 120) -> Path | None:
    """Print a report to PDF with headless Chromium when it is installed; None otherwise."""
    import shutil
    import subprocess
    import tempfile

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        return None
    pdf = html_path.with_suffix(".pdf")
    with tempfile.TemporaryDirectory() as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--no-pdf-header-footer", f"--print-to-pdf={pdf}",
                   Path(html_path).resolve().as_uri()]
        try:
            subprocess.run(command, capture_output=True, timeout=timeout, check=True)
        except (subprocess.SubprocessError, OSError):
            return None
    return pdf if pdf.is_file() and pdf.stat().st_size > 0 else None
