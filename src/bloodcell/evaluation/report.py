"""The run report: one self-contained report.html for a trained and evaluated run."""

from __future__ import annotations

from pathlib import Path

from ..core.html import esc, file_uri, page, table, thumbnail_uri
from ..data import decode_file, load_item, open_source



def _img(path: Path, alt: str, width: str = "100%") -> str:
    uri = file_uri(path)
    return f"<img src='{uri}' alt='{esc(alt)}' style='max-width:{width}'>" if uri else f"<p class='muted'>({esc(alt)} missing)</p>"


def _metric_rows(metrics: dict) -> list[list]:
    return [[k, f"{metrics[k]:.4f}"] for k in ("accuracy", "balanced_accuracy", "macro_f1", "top2_accuracy", "ece")]


def write_run_report(run_dir: Path, evaluation: dict, baseline: tuple[Path, dict] | None = None,
                     out: Path | None = None, worst: int = 16) -> Path:
    """One self-contained report.html for a trained and evaluated run.

    ``evaluation`` is what :func:`bloodcell.evaluation.evaluate_model` returned (its
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


