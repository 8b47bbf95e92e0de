"""The ``bloodcell`` command: parses arguments and calls library functions."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import __version__
from ..core.errors import BloodcellError
from .progress import console, epoch_progress, item_progress, progress_bar

app = typer.Typer(
    help="Curate, train, evaluate and serve peripheral blood cell classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
@contextmanager
def user_errors():
    """Print errors a user can act on as one line, never as a traceback."""
    try:
        yield
    except BloodcellError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        console.print(f"[bold red]error:[/] invalid settings: {problems}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def differential_table(title: str, first_column: str, percents: dict[str, float],
                       intervals: dict[str, list[float] | None] | None = None) -> Table:
    """A differential count as a table: one row per white-cell type with its percentage (and its 95%
    interval from counting alone, where given); callers add the rest."""
    table = Table(title=title)
    table.add_column(first_column)
    table.add_column("%", justify="right")
    if intervals is not None:
        table.add_column("95% interval", justify="right")
    for name, value in percents.items():
        cells = [name, f"{value:.1f}"]
        if intervals is not None:
            cells.append(f"{intervals[name][0]:.1f}-{intervals[name][1]:.1f}" if intervals.get(name) else "")
        table.add_row(*cells)
    return table


def slides_table(slides: list[dict]) -> Table:
    """One row per slide: fields, white cells counted and to check, and each white-cell type's percentage."""
    table = Table(title="By slide: % of the white cells counted (95% intervals in slides.csv)")
    for column in ("slide", "fields", "counted", "to check"):
        table.add_column(column, justify="left" if column == "slide" else "right")
    names = list(slides[0]["white_cell_percent"])
    for name in names:
        table.add_column(name[:4], justify="right")
    for slide in slides:
        table.add_row(slide["slide"], str(slide["fields"]), str(slide["white_cells"]), str(slide["to_check"]),
                      *(f"{slide['white_cell_percent'][name]:.1f}" for name in names))
    return table


def version_callback(value: bool):
    if value:
        typer.echo(f"bloodcell {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Show the version."),
):
    """bloodcell: from a lab's cell images to a trustworthy classifier."""


@app.command()
def curate(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="A folder of class folders, or an .npz file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created; the input is never changed)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of curation settings."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set near_turns=true --set split.seed=1."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated class names, in label order."),
    no_images: bool = typer.Option(False, "--no-images", help="Write the manifest and report only, no cleaned copy."),
):
    """Find duplicates, label conflicts and contaminants; write a cleaned, split dataset and a report."""
    from ..curation import CurateConfig
    from ..curation import curate as run_curation
    from ..training import load_settings

    with user_errors():
        settings = load_settings(config, set_)
        if no_images:
            settings["write_images"] = False
        cfg = CurateConfig(**settings)
        with progress_bar() as bar:
            curation = run_curation(input_path, out, cfg, class_names=classes.split(",") if classes else None,
                                    progress=item_progress(bar))
        summary = json.loads((out / "summary.json").read_text())
        Console().print(f"Curation of {input_path}", highlight=False)
        table = Table()
        table.add_column("status")
        table.add_column("items", justify="right")
        for status, count in summary["statuses"].items():
            table.add_row(status, str(count))
        Console().print(table)
        Console().print(
            f"{summary['duplicate_groups']} duplicate groups, {summary['label_conflict_groups']} label conflicts, "
            f"{summary['contaminant_groups']} contaminants. Split: "
            + ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
        )
        Console().print(f"Report: {out / 'report.html'}\nManifest: {out / 'manifest.csv'}")
        del curation


@app.command()
def leakage(
    first: Path = typer.Argument(..., help="A dataset, e.g. the training folder."),
    second: Path = typer.Argument(..., help="Another dataset, e.g. the test folder."),
    near_dhash: int = typer.Option(10, help="With --hashes-only: max dHash distance of a near copy."),
    near_phash: int = typer.Option(10, help="With --hashes-only: max pHash distance of a near copy."),
    similarity: bool = typer.Option(True, "--similarity/--hashes-only",
                                    help="Find near copies by aligned similarity (also copies edited several ways at "
                                    "once), or by hashes only (faster, misses combined edits)."),
    turns: bool = typer.Option(False, "--turns", help="Also find copies turned by quarter turns or mirrored."),
    out: Optional[Path] = typer.Option(None, help="Write the pairs found as CSV here."),
):
    """Report images of FIRST that also appear, exactly or nearly, in SECOND. Exit 1 if any do."""
    import csv

    from ..curation import CurateConfig, check_leakage

    with user_errors():
        with console.status("comparing both datasets"):
            settings = CurateConfig(near_dhash=near_dhash, near_phash=near_phash, near_turns=turns,
                                    **({} if similarity else {"near_similarity": None}))
            pairs = check_leakage(first, second, settings)
        if out:
            with open(out, "w", newline="") as handle:
                writer = csv.DictWriter(
                    handle, fieldnames=["first", "second", "kind", "dhash_distance", "phash_distance", "found_by",
                                        "similarity", "turn"]
                )
                writer.writeheader()
                writer.writerows(pairs)
        exact = sum(p["kind"] == "exact" for p in pairs)
        Console().print(f"{len(pairs)} leaked pairs ({exact} exact, {len(pairs) - exact} near)")
        for pair in pairs[:20]:
            Console().print(f"  {pair['kind']}: {pair['first']}  ==  {pair['second']}", highlight=False)
        if pairs:
            raise typer.Exit(1)


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML training config (see configs/)."),
    set_: list[str] = typer.Option([], "--set", help="Override any setting, e.g. --set phases.1.lr=3e-4."),
    data: Optional[Path] = typer.Option(None, help="Curated data folder (output of `bloodcell curate`)."),
    model: Optional[str] = typer.Option(None, help="'cnn' for the custom CNN, or a timm model name."),
    weights: Optional[Path] = typer.Option(None, help="Local ImageNet weights (.safetensors or .pth)."),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    epochs: Optional[int] = typer.Option(None, help="Total epochs, spread over the phases in proportion."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<time>-<model>-<size>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run from its last checkpoint."),
    seed: Optional[int] = typer.Option(None),
):
    """Train the custom CNN or fine-tune a pretrained backbone in two phases."""
    from ..training import build_train_config
    from ..training import train as run_training

    with user_errors():
        cfg = None if resume is not None else build_train_config(
            config, set_, epochs, data=data, model=model, weights=weights, image_size=image_size,
            batch_size=batch_size, out=out, seed=seed)
        with progress_bar(transient=True) as bar:
            result = run_training(cfg, resume=resume, log=lambda line: bar.console.print(line, highlight=False, markup=False),
                                  progress_factory=epoch_progress(bar))
        Console().print(f"Run: {result.run_dir}")


def warn_if_fields(counted: tuple[int, int] | None, verb: str, advice: str) -> None:
    """One warning line when a sample of the images (:func:`bloodcell.inference.count.count_field_like`) is
    mostly whole fields, which a classifier of single-cell crops reads as if each were one framed cell."""
    from ..inference.count import mostly_fields

    if mostly_fields(counted):
        console.print(Text.assemble(
            ("warning", "bold yellow"),
            f": {counted[0]} of {counted[1]} images looked at are whole fields (a white cell small or off centre "
            f"among red cells), each {verb} here as if it were one framed cell. {advice}"), highlight=False)


@app.command()
def evaluate(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A run directory or a checkpoint in one."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data to score (a curated folder uses its test split)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default MODEL/evaluation)."),
    compare: Optional[list[Path]] = typer.Option(None, "--compare", help="Two evaluated runs: show both confusion matrices and the per-class change."),
    corruptions: bool = typer.Option(False, "--corruptions", help="Also score 12 corruption families x 5 severities."),
    tta: bool = typer.Option(False, "--tta", help="Average over the 8 flips/rotations."),
    seed: int = typer.Option(0, help="Seed of the corruptions."),
    fields: bool | None = typer.Option(None, "--fields/--no-fields", help="The images are whole fields, one white "
                                          "cell each: find it with the cell detector and classify it as `bloodcell "
                                          "count` does. Default: looked at first, and read so when most are."),
    detector: str = typer.Option("default", "--detector", help="For whole fields: a train-detector run, or 'default'."),
    split: Optional[str] = typer.Option(None, "--split", help="Boxed fields (YOLO layout): score one split "
                                        "(train, val, test); default: every field of the set."),
    skip_unknown: bool = typer.Option(False, "--skip-unknown", help="Leave out class folders naming none of the "
                                      "model's classes (smudge cells, blasts...) instead of stopping; in boxed "
                                      "fields, boxes of such classes (a detection on one counts neither way)."),
    label_fixes: Optional[Path] = typer.Option(None, "--label-fixes", help="Boxed fields: a JSON list of label "
                                               "fixes (boxes of the wrong kind, boxes left out; as evaluate's review "
                                               "writes them); the label files are not changed."),
):
    """Score a trained model: accuracy, macro-F1, per-class recall, calibration, robustness.

    Given boxed fields (YOLO, Roboflow or Pascal VOC), scores the cell detector per kind and, where the boxes name white-cell types, the types of the cells found."""
    from ..data.fields import is_field_set
    from ..evaluation import compare_runs, evaluate_model

    with user_errors():
        if compare:
            if len(compare) != 2:
                raise BloodcellError("--compare takes two run directories: --compare RUN_A --compare RUN_B")
            results = []
            for run in compare:
                path = run / "evaluation" / "metrics.json"
                if not path.is_file():
                    raise BloodcellError(f"{run}: not evaluated yet; run `bloodcell evaluate --model {run} --data DATA` first")
                results.append(json.loads(path.read_text()))
            target = out or Path("comparison")
            summary = compare_runs(results[0], results[1], results[1]["confusion_matrix"]["classes"], target)
            table = Table(title=f"{compare[0].name} -> {compare[1].name}")
            table.add_column("class")
            table.add_column("recall change", justify="right")
            for name, change in summary["recall_change"].items():
                table.add_row(name, f"{change:+.4f}")
            table.add_row("accuracy", f"{summary['accuracy_change']:+.4f}")
            table.add_row("macro-F1", f"{summary['macro_f1_change']:+.4f}")
            Console().print(table)
            Console().print(f"Side by side: {target / 'comparison.png'}")
            return
        if model is None or data is None:
            raise BloodcellError("evaluate needs --model and --data (or --compare RUN_A --compare RUN_B)")
        out = out or model / "evaluation"
        if is_field_set(data):
            from ..evaluation.boxed_fields import evaluate_field_set

            with console.status("reading the fields"):
                result = evaluate_field_set(model, data, out, detector=detector, split=split, skip_unknown=skip_unknown,
                                            label_fixes=label_fixes)
            print_field_set_result(result)
            Console().print(f"Written to {out}")
            return
        if split or label_fixes:
            raise BloodcellError(f"{'--split' if split else '--label-fixes'} is for boxed fields (YOLO layout); "
                                 f"{data} is not one")
        with console.status("evaluating"):
            result = evaluate_model(model, data, out, corruptions=corruptions, tta=tta, seed=seed, fields=fields,
                                    detector=detector, check_fields=True, skip_unknown=skip_unknown)
        table = Table(title=f"{model} on {data} ({result['count']} images)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "top2_accuracy", "ece"):
            table.add_row(key, f"{result[key]:.4f}")
        if "corruptions" in result:
            table.add_row("corrupted mean accuracy", f"{result['corruptions']['mean']:.4f}")
            for family, value in result["corruptions"]["family_mean"].items():
                table.add_row(f"  {family}", f"{value:.4f}")
        Console().print(table)
        if result.get("class_folders"):
            from ..data.sources import renamed_line

            Console().print(renamed_line(result["class_folders"]), highlight=False)
        for folder, files in result.get("left_out", {}).items():
            Console().print(f"{folder}/: {files} image(s) of a class the model does not know, left out", highlight=False)
        for bad in result.get("unreadable", []):
            Console().print(Text.assemble(("skipped", "yellow"), f" {bad['path']}: {bad['error']}"), highlight=False)
        field_like = result.get("field_like")
        if field_like and result["read_as"] == "fields":
            Console().print(f"{field_like['whole_fields']} of {field_like['images_looked_at']} images looked at are whole "
                            "fields: each was read as `bloodcell count` reads it, its white cell found by the cell "
                            "detector and classified (--no-fields scores them as single-cell crops)", highlight=False)
        elif field_like:
            warn_if_fields((field_like["whole_fields"], field_like["images_looked_at"]), "scored",
                           "`--fields` finds the white cell first, as `bloodcell count` does.")
        if "fields" in result:
            found = result["fields"]
            Console().print(f"White cell found in {found['white_cell_found']} of {found['images']} fields "
                            "(the others were scored whole)", highlight=False)
        shift = result.get("domain_shift")
        if shift:
            verdict = "[bold yellow]flagged[/]: unlike the training lab's images" if shift["flagged"] else "not flagged"
            Console().print(f"Domain shift: {verdict} ({shift_detail(shift, 'images')})", highlight=False)
        Console().print(f"Written to {out}")


def shift_detail(shift: dict, noun: str) -> str:
    """How a batch's shift verdict was reached, in words: how many lie beyond the threshold, and the median."""
    many = shift["images_flagged"] / max(shift["images"], 1)
    return (f"{shift['images_flagged']} of {shift['images']} {noun} out of distribution ({many:.0%}; the training "
            f"lab's own: about 1%), median score {shift['score']:.2f}; threshold 1")


def print_field_set_result(result: dict) -> None:
    """Detection per kind, and the white-cell types where the set gives them."""
    table = Table(title=f"{result['model']} on {result['data']} ({result['fields']} fields, split {result['split']})")
    for column in ("kind", "boxes", "AP50", "recall", "precision", "found (IoU 0.3)"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for kind in ("white_cell", "red_cell", "platelet"):
        row = result["detection"][kind]
        table.add_row(kind, str(row["boxes"]), fmt(row["ap50"]), fmt(row["recall"]), fmt(row["precision"]),
                      fmt(row["recall_iou30"]))
    Console().print(table)
    types = result.get("types")
    if types:
        table = Table(title=f"white-cell types: {types['typed_cells']} typed cells, {types['found']} found")
        for column in ("type", "cells", "found", "right", "true share", "counted share"):
            table.add_column(column, justify="left" if column == "type" else "right")
        for name, row in types["per_class"].items():
            shares = types["differential"].get(name, {})
            table.add_row(name, str(row["cells"]), str(row["found"]), str(row["right"]),
                          f"{shares.get('true_share', 0):.1%}", f"{shares.get('counted_share', 0):.1%}")
        Console().print(table)
        Console().print(f"Type accuracy {types['accuracy']:.4f} (missed cells count as wrong; "
                        f"{fmt(types['accuracy_where_found'])} where found), balanced {types['balanced_accuracy']:.4f}, "
                        f"{types['to_check']} to check; differential off by up to "
                        f"{100 * types['differential_max_error']:.1f} points", highlight=False)
    for bad in result["unreadable"]:
        Console().print(f"skipped {bad['path']}: {bad['error']}", highlight=False)
    review = result.get("review")
    if review and (review["kind"] or review["unlabelled"]):
        Console().print(f"Labels worth a second look ({review['file']}, {review.get('sheet', 'no sheet')}): "
                        f"{review['kind']} box(es) whose kind the "
                        f"detector contradicts, {review['unlabelled']} cell(s) it is sure of that no box labels; "
                        "errors in the labels count against the detector above", highlight=False)
        if review.get("label_fixes"):
            Console().print(f"Suggested fixes in {review['label_fixes']}: read each box, keep the right ones, then pass "
                            "the file to --label-fixes (your label files are not changed)", highlight=False)
    if result.get("label_fixes"):
        fixes = result["label_fixes"]
        Console().print(f"Scored with {fixes['lines']} label line(s) fixed by {fixes['file']}", highlight=False)
    if result.get("left_out"):
        Console().print("left out (classes bloodcell does not know; a detection on one counts neither way): "
                        + ", ".join(f"{name} {boxes} box(es)" for name, boxes in result["left_out"].items()), highlight=False)
    shift = result.get("domain_shift")
    if shift:
        verdict = "[bold yellow]flagged[/]: unlike the training lab's cells" if shift["flagged"] else "not flagged"
        Console().print(f"Domain shift: {verdict} ({shift_detail(shift, 'white cells')})", highlight=False)


@app.command()
def calibrate(
    model: Path = typer.Option(..., "--model", "-m", help="A run directory."),
    data: Path = typer.Option(..., "--data", "-d", help="The split dataset it was trained on (the output of `bloodcell curate`)."),
    temperature: bool = typer.Option(True, help="Also refit the softmax temperature on the validation split."),
):
    """Refit a run's temperature, out-of-distribution statistics and shift temperature (training does all three)."""
    from ..evaluation.shift import calibrate_from_data

    with user_errors():
        with console.status("calibrating"):
            calibrate_from_data(model, data, log=lambda line: console.print(line, highlight=False, markup=False),
                                temperature=temperature)
        Console().print(f"Updated {model / 'model.json'}; export it again to carry the scores into ONNX")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A trained run directory."),
    baseline: Optional[Path] = typer.Option(None, help="Another run shown beside it (e.g. the custom CNN)."),
    data: Optional[Path] = typer.Option(None, help="Evaluate on this data first when the run has no evaluation."),
):
    """Write RUN_DIR/report.html: data, curves, confusion matrices, robustness, calibration, mistakes."""
    from ..core.html import html_to_pdf
    from ..evaluation import evaluate_model
    from ..evaluation.report import write_run_report

    with user_errors():
        evaluations = []
        for run in [run_dir] + ([baseline] if baseline else []):
            path = run / "evaluation" / "metrics.json"
            if path.is_file():
                evaluations.append(json.loads(path.read_text()))
            elif data is not None:
                with console.status(f"evaluating {run}"):
                    evaluations.append(evaluate_model(run, data, run / "evaluation", corruptions=True, fields=False))
            else:
                raise BloodcellError(f"{run}: not evaluated yet; pass --data DATA or run `bloodcell evaluate` first")
        path = write_run_report(run_dir, evaluations[0], baseline=(baseline, evaluations[1]) if baseline else None)
        Console().print(f"Report: {path}")
        pdf = html_to_pdf(path)
        Console().print(f"PDF: {pdf}" if pdf else "PDF: skipped (no headless Chromium found)")


@app.command()
def pipeline(
    data: Optional[Path] = typer.Option(None, help="Raw images: class folders or .npz (default: $BLOODCELL_DATA/pbc224)."),
    out: Path = typer.Option(Path("runs/demo"), help="Folder for every step's output."),
    profile: str = typer.Option("quick", help="quick (under 15 min on 2 cores) or full (real results)."),
    weights: Optional[Path] = typer.Option(None, help="ImageNet weights for MobileNetV3 (default: the file in $BLOODCELL_WEIGHTS)."),
):
    """The whole job: curate, train the CNN, fine-tune MobileNetV3, evaluate both, write the report."""
    from ..workflows import run_pipeline

    with user_errors():
        with progress_bar(transient=True) as bar:
            path = run_pipeline(data, out, profile, weights,
                                log=lambda line: bar.console.print(line, markup=False),
                                progress_factory=epoch_progress(bar))
        Console().print(f"Report: {path}")


@app.command()
def recipe(
    config: Path = typer.Option(..., "--config", "-c", help="Recipe YAML: curate, train and export sections (configs/default_model.yaml)."),
    data: Optional[Path] = typer.Option(None, help="Raw images: class folders or .npz (default: $BLOODCELL_DATA/pbc224)."),
    out: Path = typer.Option(Path("runs/recipe"), help="Folder for the curated data, the run and model.onnx."),
    set_: list[str] = typer.Option([], "--set", help="Override any setting, e.g. --set train.image_size=96."),
):
    """A deployable model from raw images in one command: curate, train, calibrate, export to ONNX."""
    from ..workflows import load_recipe, run_recipe

    with user_errors():
        settings = load_recipe(config, set_)
        with progress_bar(transient=True) as bar:
            summary = run_recipe(settings, data, out, log=lambda line: bar.console.print(line, markup=False),
                                 progress_factory=epoch_progress(bar))
        Console().print(f"Model: {out / 'model.onnx'} (run {summary['run']}, {summary['timings']['total_s'] / 60:.1f} min)")


@app.command()
def predict(
    paths: list[Path] = typer.Argument(..., help="Image files, folders (recursive) or .npz files."),
    model: str = typer.Option("default", "--model", "-m", help="model.onnx, a run directory, or 'default'."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write predictions here (CSV, or JSON with --format json)."),
    fmt: str = typer.Option("csv", "--format", help="csv or json"),
    abstain_below: float = typer.Option(0.7, help="Mark cells below this confidence for a person to check."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: Optional[int] = typer.Option(None, "--workers",
                                          help="Processes decoding images (default: one per core from 1,024 images; 0: none)."),
    sort_into: Optional[Path] = typer.Option(None, "--sort-into", help="Copy each image into DIR/<class>/ (or DIR/to_check/) "
                                             "to review and sort, then: bloodcell adapt --data DIR."),
):
    """Classify images; print a differential count; exit non-zero only when nothing could be read."""
    from ..inference import differential_count, load_predictor, predict_paths, shift_summary, write_predictions
    from ..inference.batch import boot_workers_for, sort_for_review
    from ..inference.count import count_field_like

    with user_errors():
        if fmt not in ("csv", "json"):
            raise BloodcellError(f"--format must be csv or json, got {fmt!r}")
        boot_workers_for(paths, workers)  # while the model loads
        predictor = load_predictor(model)
        with progress_bar() as bar:
            rows, bad = predict_paths(predictor, [str(p) for p in paths], batch_size=batch_size, workers=workers,
                                      abstain_below=abstain_below,
                                      progress=item_progress(bar)(f"predicting ({predictor.backend})", None))
        for path, reason in bad:
            # Styled as Text, so brackets in a file name are printed as they are, not parsed as markup.
            console.print(Text.assemble(("skipped", "yellow"), f" {path}: {reason}"), highlight=False)
        if not rows:
            raise BloodcellError("no image could be read" + (f" ({len(bad)} refused)" if bad else ""))
        if out:
            write_predictions(rows, predictor.class_names, out, fmt)
        elif fmt == "json":
            typer.echo(json.dumps(rows, indent=1))
        else:
            import csv as csv_module

            writer = csv_module.DictWriter(sys.stdout, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        counts = differential_count(rows)
        table = differential_table(f"Differential count ({counts['white_cells']} white cells)", "cell type",
                                   counts["white_cell_percent"], counts["white_cell_percent_95"])
        table.add_row("platelets (count)", str(counts["platelets"]))
        table.add_row("erythroblasts (count)", str(counts["erythroblasts"]))
        if predictor.has_shift:  # a cell may be both; each is counted once in the total
            table.add_row("to check (low confidence / unlike the training lab)",
                          f"{counts['to_check']} ({counts['abstained']} / {counts['out_of_distribution']})")
        else:
            table.add_row("to check (low confidence)", str(counts["abstained"]))
        console.print(table)
        shift = shift_summary(rows)
        if shift and shift["flagged"]:
            console.print(Text.assemble(
                ("warning", "bold yellow"),
                f": these images do not look like the lab the model was trained on ({shift_detail(shift, 'images')}). "
                "Its answers may be wrong with high confidence; check them, or adapt the model (bloodcell adapt)."),
                highlight=False)
        warn_if_fields(count_field_like([row["path"] for row in rows]), "classified",
                       "`bloodcell count` finds and types every cell of a field.")
        console.print(f"{len(rows)} predicted, {len(bad)} skipped" + (f"; written to {out}" if out else ""))
        if sort_into is not None:
            sorted_counts = sort_for_review(rows, [str(p) for p in paths], sort_into)
            console.print(f"copied into {sort_into}: " + ", ".join(f"{n} {folder}" for folder, n in sorted(sorted_counts.items()))
                          + f". Review them (move a wrong cell to its class's folder, sort to_check/), then adapt the model "
                          f"to them: bloodcell adapt --data {sort_into}", highlight=False)


@app.command()
def adapt(
    model: str = typer.Option("default", "--model", "-m", help="A run directory (PyTorch weights) or 'default'."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Class folders of the lab's own labelled cells (5-20 per class; a subset of the classes is fine; a to_check/ folder, as predict --sort-into and count --crops write, is left out), or the lab's boxed fields with typed white cells."),
    unlabelled: Optional[Path] = typer.Option(None, "--unlabelled", help="A folder (recursive) of the lab's unlabelled cell images, or boxed fields (every white cell boxed)."),
    out: Path = typer.Option(..., "--out", "-o", help="The adapted model directory to write."),
    steps: int = typer.Option(150, help="Fine-tuning steps."),
    folds: int = typer.Option(3, help="Folds of the cross-validated estimate on the labelled cells."),
    seed: int = typer.Option(0),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Also export OUT/model.onnx."),
    lab_frequencies: bool = typer.Option(False, "--lab-frequencies", help="With --data and --unlabelled: correct for the lab's class frequencies, estimated on the unlabelled cells."),
    suggest: int = typer.Option(20, help="With --unlabelled: list this many of those cells, the adapted model's least certain, in OUT/to_label.csv (0: none)."),
    fields: bool | None = typer.Option(None, "--fields/--no-fields", help="The images are whole fields: --data class folders one white cell each, --unlabelled every white cell the cell detector finds. Default: looked at first, and read so when most are."),
    detector: str = typer.Option("default", "--detector", help="For whole fields: a train-detector run, or 'default'."),
    skip_unknown: bool = typer.Option(False, "--skip-unknown", help="Leave out --data class folders naming none of the model's classes (smudge cells, blasts...) instead of stopping; in boxed fields, boxes of such classes."),
):
    """Adapt a model to one lab's images; OUT works with every --model (evaluate, predict, serve, export)."""
    from ..training.adapt import AdaptConfig
    from ..workflows import adapt_model

    with user_errors():
        log = lambda line: console.print(line, highlight=False, markup=False)  # noqa: E731
        with console.status("adapting"):
            adapt_model(model, out, data, unlabelled, AdaptConfig(steps=steps, seed=seed, lab_frequencies=lab_frequencies),
                        folds, onnx, log, suggest, fields, detector, skip_unknown)
        Console().print(f"Adapted model: {out}")


@app.command()
def export(
    model: Path = typer.Option(..., "--model", "-m", help="A run directory or a checkpoint in one."),
    out: Path = typer.Option(..., "--out", "-o", help="The .onnx file to write."),
    check: Optional[Path] = typer.Option(None, help="Images (folder/.npz/curated data) to check ONNX against PyTorch."),
    quantize: Optional[str] = typer.Option(None, help="Also write an int8 model: 'dynamic' (fully connected layers) or 'static' (everything, calibrated on --check images)."),
):
    """Export to ONNX with the preprocessing contract in its metadata; check it against PyTorch."""
    from ..inference.export import check_set, export_onnx

    with user_errors():
        images, labels = check_set(check) if check is not None else (None, None)
        report = export_onnx(model, out, images, quantize, labels)
        for key, value in report.items():
            Console().print(f"{key}: {value}")
        if report.get("int8_agreement", 1.0) < 0.99:
            console.print(f"[yellow]warning:[/] the int8 model agrees with the float one on only "
                          f"{report['int8_agreement']:.1%} of the check images; do not use it")


@app.command("distill-targets")
def distill_targets(
    teachers: list[Path] = typer.Argument(..., help="Teacher models: exported .onnx files or run directories; their probabilities are averaged."),
    data: Path = typer.Option(..., "--data", "-d", help="The curated data the student trains on (`bloodcell curate` output)."),
    out: Path = typer.Option(..., "--out", "-o", help="The .safetensors file to write."),
    split: str = typer.Option("train", help="Which split to score (train: what the student learns from)."),
):
    """Score the training images with teacher models, for `train.distill` (knowledge distillation)."""
    from ..data import training_sources
    from ..inference.teachers import label_disagreements, save_targets, teacher_targets, write_disagreements

    with user_errors():
        sources, class_names = training_sources(data)
        if split not in sources:
            raise BloodcellError(f"{data}: no {split} split (found {', '.join(sources)})")
        source = sources[split]
        with progress_bar() as bar:
            advance = item_progress(bar)(f"{len(teachers)} teacher(s) on {split}", len(source.items))
            keys, probabilities, names = teacher_targets(teachers, source, class_names, on_chunk=advance)
        save_targets(out, keys, probabilities, names, teachers)
        disagreements = label_disagreements(source, keys, probabilities, names)
        listing = out.with_name(out.stem + ".disagreements.csv")
        write_disagreements(listing, disagreements)
        console.print(f"{len(keys)} images scored by {len(teachers)} teacher(s), agreeing with "
                      f"{1 - len(disagreements) / len(keys):.2%} of the labels; written to {out}")
        console.print(f"{len(disagreements)} images where the teachers' class is not the label: {listing}")


@app.command()
def count(
    paths: list[Path] = typer.Argument(..., help="Whole fields: image files or folders (recursive); the fields of "
                                       "one folder are one slide."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for cells.csv, counts.csv, slides.csv, summary.json, "
                             "report.html and overlays/."),
    model: str = typer.Option("default", "--model", "-m", help="The classifier: model.onnx, a run directory, or 'default'."),
    detector: str = typer.Option("default", "--detector", help="The cell detector: a train-detector run, or 'default'."),
    abstain_below: float = typer.Option(0.7, help="White cells below this confidence go to 'to check'."),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Draw OUT/overlays/<image>.png."),
    crops: bool = typer.Option(False, "--crops", help="Cut each white cell out into OUT/crops/<class>/ (or crops/to_check/), "
                               "to review and sort, then: bloodcell adapt --data OUT/crops."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write OUT/report.html: each slide's differential and "
                                "its white cells as thumbnails by class."),
    batch_size: int = typer.Option(8, "--batch-size"),
):
    """Find every cell in whole smear fields, type the white cells, and count them."""
    from ..inference.batch import DIFFERENTIAL_CELLS
    from ..inference.count import mostly_to_check
    from ..workflows import count_fields

    with user_errors():
        with progress_bar() as bar:
            summary = count_fields([str(p) for p in paths], out, model, detector, abstain_below, batch_size,
                                   overlays=overlays, progress_factory=partial(item_progress(bar), "counting"),
                                   crops=crops, report=report)
        for skipped in summary["skipped"]:
            console.print(Text.assemble(("skipped", "yellow"), f" {skipped['image']}: {skipped['reason']}"), highlight=False)
        diff = summary["differential"]
        table = differential_table(f"{diff['fields']} fields: {diff['white_cell_boxes']} white cells, "
                                   f"{diff['red_cells']} red cells, {diff['platelets']} platelets",
                                   "white cell type", diff["white_cell_percent"], diff["white_cell_percent_95"])
        table.add_row("counted (white cells)", str(diff["white_cells"]))
        table.add_row("erythroblasts (count)", str(diff["erythroblasts"]))
        table.add_row("to check (low confidence / unlike the training lab)", str(diff["to_check"]))
        table.add_row("fields without white cells", str(diff["fields_without_white_cells"]))
        console.print(table)
        slides = summary["slides"]
        if len(slides) > 1:
            console.print(slides_table(slides))
        thin = [slide for slide in slides if 0 < slide["white_cells"] < DIFFERENTIAL_CELLS]  # none counted: nothing to read
        if len(slides) == 1 and thin:
            console.print(Text.assemble(("note", "bold yellow"), f": {diff['white_cells']} white cells counted, fewer than "
                                        f"the {DIFFERENTIAL_CELLS} of a manual differential: read the percentages with "
                                        "their 95% intervals."), highlight=False)
        elif thin:
            console.print(Text.assemble(
                ("note", "bold yellow"), f": {len(thin)} of {len(slides)} slides have fewer than {DIFFERENTIAL_CELLS} "
                "white cells counted, the count of a manual differential: read their percentages with the 95% intervals "
                "in slides.csv."), highlight=False)
        if summary["magnified"]:
            factors = sorted(m["magnification"] for m in summary["magnified"])
            console.print(f"{len(factors)} field(s) were taken at a lower magnification than the detector's training "
                          f"fields and were read on tiles magnified {factors[0]:g}-{factors[-1]:g}x "
                          "(summary.json lists them)", highlight=False)
        if mostly_to_check(diff):
            console.print(Text.assemble(
                ("warning", "bold yellow"),
                f": {diff['to_check']} of {diff['white_cell_boxes']} white cells are to check: these fields do not look "
                "like the lab the classifier was trained on. Check them, or adapt the model (bloodcell adapt)."), highlight=False)
        console.print(f"Written to {out}: cells.csv, counts.csv, slides.csv, summary.json" + (", report.html" if report else "")
                      + (", overlays/" if overlays else "")
                      + (", crops/" if crops else ""))
        if crops and diff["white_cell_boxes"]:
            console.print(f"Review the white cells in {out / 'crops'}: move each wrong one to its class's folder, sort "
                          f"crops/to_check/, then adapt the model to them: bloodcell adapt --data {out / 'crops'}", highlight=False)


@app.command("train-detector")
def train_detector(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Fields in YOLO layout (images/, labels/, classes.txt); default $BLOODCELL_DATA/fields."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The run directory (default runs/det-<time>)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML file of settings (see DetectorTrainConfig)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 60)."),
    seed: Optional[int] = typer.Option(None),
    resume: Optional[Path] = typer.Option(None, help="Resume this run directory where it stopped."),
    label_fixes: Optional[Path] = typer.Option(None, "--label-fixes", help="A JSON list of label fixes (boxes of the "
                                               "wrong kind, boxes left out; see docs/fields.md); the label files are not changed."),
):
    """Train the cell detector (white cells, red cells, platelets) on whole fields."""
    import yaml

    from ..core.settings import data_root, resolve_data
    from ..training.detector import DetectorTrainConfig, train_detector as run_training

    with user_errors():
        log = lambda line: console.print(line, highlight=False, markup=False)  # noqa: E731
        if resume is not None:
            run_training(resume=resume, log=log)
            return
        settings = yaml.safe_load(config.read_text()) if config else {}
        if not isinstance(settings, dict):
            raise BloodcellError(f"{config}: expected a mapping of settings")
        given = data if data is not None else settings.get("data")
        if given is None and data_root() is None:
            raise BloodcellError("no fields given: pass --data DIR (YOLO layout: images/<split>/, labels/<split>/, "
                                 "classes.txt listing white_cell, red_cell, platelet) or set BLOODCELL_DATA")
        settings["data"] = str(resolve_data(given, "fields"))
        settings.update({k: v for k, v in {"out": out, "epochs": epochs, "seed": seed,
                                           "label_fixes": label_fixes}.items() if v is not None})
        run_training(DetectorTrainConfig(**settings), log=log)


@app.command("export-detector")
def export_detector(
    detector: Path = typer.Option(..., "--detector", help="A train-detector run directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The .onnx file (default RUN/detector.onnx)."),
):
    """Export a trained detector to ONNX and check it against PyTorch."""
    from ..inference.detect import export_detector as run_export

    with user_errors():
        report = run_export(detector, out)
        console.print(f"{report['onnx']} ({report['bytes'] / 1e6:.1f} MB; largest box difference from PyTorch "
                      f"{report['max_box_diff']:.2g} px, score {report['max_score_diff']:.2g})")


@app.command()
def serve(
    model: str = typer.Option("default", "--model", "-m", help="model.onnx, a run directory, or 'default'."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="BLOODCELL_API_KEY",
                                          help="Ask every /v1 request for this key (X-API-Key header)."),
    detector: str = typer.Option("default", "--detector", help="The cell detector for whole fields (/v1/count): a train-detector run, or 'default'."),
    workers: int = typer.Option(1, "--workers", help="Server processes on the one port (more where there are many cores)."),
    prep_workers: Optional[int] = typer.Option(None, "--prep-workers",
                                               help="Processes decoding uploads, per server process (default: its share of the cores less one; 0: decode in the server process)."),
    batch_window_ms: float = typer.Option(0.0, "--batch-window-ms",
                                          help="How long a network batch also waits for requests still being decoded (requests that queue while the network runs are batched anyway)."),
    access_log: bool = typer.Option(False, "--access-log", help="Log a line per request."),
):
    """Serve the web page at / and the API at /v1 (OpenAPI docs at /docs)."""
    with user_errors():
        from ..service.app import serve as run_server

        run_server(model, host, port, api_key=api_key, detector=detector, workers=workers, prep_workers=prep_workers,
                   batch_window_ms=batch_window_ms, access_log=access_log,
                   warn=lambda line: console.print(Text.assemble(("warning:", "yellow"), f" {line}"), highlight=False))


@app.command()
def explain(
    images: list[Path] = typer.Argument(..., help="Image files."),
    model: Path = typer.Option(..., "--model", "-m", help="A run directory (Grad-CAM needs the PyTorch model)."),
    out: Path = typer.Option(Path("explanations"), "--out", "-o"),
):
    """Write Grad-CAM overlays: where the model looked for its prediction."""
    from PIL import Image

    from ..data import decode_file
    from ..inference import load_predictor
    from ..inference.explain import grad_cam, overlay

    with user_errors():
        predictor = load_predictor(model)
        if predictor.backend != "torch":
            raise BloodcellError(f"{model}: Grad-CAM needs a run directory (PyTorch), not an ONNX file")
        out.mkdir(parents=True, exist_ok=True)
        for path in images:
            try:
                image = predictor.prepare(decode_file(path)[0])
            except Exception as exc:  # noqa: BLE001 - reported per file, the rest go on
                console.print(f"skipped {path}: {exc}", markup=False)
                continue
            cam, target = grad_cam(predictor.torch_model, image)
            target_path = out / f"{path.stem}_{predictor.class_names[target]}.png"
            Image.fromarray(overlay(image, cam)).save(target_path)
            Console().print(f"{path} -> {predictor.class_names[target]}: {target_path}")


def run():  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # `python -m bloodcell.cli`, e.g. under torchrun
    app()
