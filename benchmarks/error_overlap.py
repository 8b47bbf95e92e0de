"""Where the errors are: several trained models' mistakes on one test split, side by side.

Reads the `predictions.csv` that `bloodcell evaluate` writes for each run (the same test
split: images are matched by file name), and reports
- each run's errors, and how many test images are wrong in 1, 2, ... of the runs (an image
  every run gets wrong is a property of the data or the recipe, not of one run's luck);
- errors per subclass, from the file names (PBC: band `BNE_` and segmented `SNE_`
  neutrophils, `MY_`/`MMY_`/`PMY_` immature granulocytes), averaged over the runs;
- the ensemble of all runs (mean of their calibrated probabilities): what distilling these
  models into one, or averaging them at prediction time, could at best be expected to give;
- with ``--student RUN`` (a model outside the ensemble, say one distilled from it): its
  errors, how many of them the ensemble makes too, and how often it agrees with the ensemble.
Writes benchmarks/results/error_overlap.json.

    .venv/bin/python benchmarks/error_overlap.py runs/recipe-r13-ema runs/recipe-r15-w55 ...
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def read_predictions(run: Path) -> dict[str, dict]:
    path = run / "evaluation" / "predictions.csv" if (run / "evaluation").is_dir() else run / "predictions.csv"
    if not path.is_file():
        sys.exit(f"{run}: no predictions.csv (run `bloodcell evaluate --model RUN/model.onnx --data RUN/curated --out RUN/evaluation`)")
    with open(path, newline="") as handle:
        return {Path(row["path"]).name: row for row in csv.DictReader(handle)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (with evaluation/predictions.csv)")
    parser.add_argument("--subclass-pattern", default=r"^([A-Za-z]+)_")
    parser.add_argument("--show", type=int, default=3, help="list the images wrong in at least this many runs")
    parser.add_argument("--student", type=Path, action="append", default=[],
                        help="a run outside the ensemble to compare with it (repeatable)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "error_overlap.json")
    args = parser.parse_args()

    runs = {str(run): read_predictions(run) for run in args.runs}
    students = {str(run): read_predictions(run) for run in args.student}
    first = next(iter(runs.values()))
    names = sorted(first)
    for run, rows in {**runs, **students}.items():
        if sorted(rows) != names or any(rows[n]["label"] != first[n]["label"] for n in names):
            sys.exit(f"{run}: not the same test images and labels as {args.runs[0]}")
    header = list(next(iter(first.values())))
    classes = header[header.index("confidence") + 1:]
    labels = {n: first[n]["label"] for n in names}
    # Lists, not sets: the order of images with equal counts below then follows the file names,
    # so the same runs give the same JSON every time.
    wrong = {run: [n for n in names if rows[n]["pred"] != labels[n]] for run, rows in runs.items()}
    times_wrong = Counter(n for errors in wrong.values() for n in errors)

    def subclass(name: str) -> str:
        match = re.search(args.subclass_pattern, name)
        return f"{labels[name]}:{match.group(1)}" if match else labels[name]

    sizes = Counter(subclass(n) for n in names)
    errors_per_subclass = Counter(subclass(n) for errors in wrong.values() for n in errors)
    taken_for = {s: Counter() for s in sizes}  # what each subclass's errors were called, over all runs
    for run, errors in wrong.items():
        for n in errors:
            taken_for[subclass(n)][runs[run][n]["pred"]] += 1
    probabilities = np.mean([[[float(rows[n][c]) for c in classes] for n in names] for rows in runs.values()], axis=0)
    ensemble_pred = {n: classes[int(p.argmax())] for n, p in zip(names, probabilities)}
    ensemble_wrong = [n for n in names if ensemble_pred[n] != labels[n]]
    compared = {}
    for run, rows in students.items():
        errors = {n for n in names if rows[n]["pred"] != labels[n]}
        compared[run] = {"errors": len(errors), "accuracy": 1 - len(errors) / len(names),
                         "also_ensemble_errors": len(errors & set(ensemble_wrong)),
                         "agreement_with_ensemble": sum(rows[n]["pred"] == ensemble_pred[n] for n in names) / len(names)}

    result = {
        "runs": list(runs),
        "test_images": len(names),
        "errors": {run: len(errors) for run, errors in wrong.items()},
        "accuracy": {run: 1 - len(errors) / len(names) for run, errors in wrong.items()},
        "images_wrong_in_k_runs": {str(k): v for k, v in sorted(Counter(times_wrong.values()).items())},
        "images_wrong_in_any_run": len(times_wrong),
        "subclasses": {s: {"images": sizes[s], "mean_errors_per_run": errors_per_subclass[s] / len(runs),
                           "error_rate": errors_per_subclass[s] / len(runs) / sizes[s],
                           "taken_for": dict(taken_for[s].most_common())} for s in sorted(sizes)},
        "ensemble": {"errors": len(ensemble_wrong), "accuracy": 1 - len(ensemble_wrong) / len(names),
                     "members_agreement": {run: sum(rows[n]["pred"] == ensemble_pred[n] for n in names) / len(names)
                                           for run, rows in runs.items()}},
        "students": compared,
        "often_wrong": [{"image": n, "label": labels[n], "wrong_in": times_wrong[n],
                         "predicted": [rows[n]["pred"] for rows in runs.values()]}
                        for n, k in times_wrong.most_common() if k >= args.show],
    }
    print(f"{len(names)} test images, {len(runs)} runs")
    for run in runs:
        print(f"  {run}: {result['errors'][run]} errors ({result['accuracy'][run]:.4f})")
    print("images wrong in k runs: " + ", ".join(f"{k}: {v}" for k, v in result["images_wrong_in_k_runs"].items())
          + f" (any: {len(times_wrong)})")
    print(f"ensemble of all runs (mean probability): {len(ensemble_wrong)} errors ({result['ensemble']['accuracy']:.4f})")
    for run, figures in compared.items():
        print(f"  compared: {run}: {figures['errors']} errors, {figures['also_ensemble_errors']} of them the ensemble's too; "
              f"agrees with the ensemble on {figures['agreement_with_ensemble']:.2%} of the images")
    print("mean errors per run by subclass:")
    for s, figures in sorted(result["subclasses"].items(), key=lambda kv: -kv[1]["mean_errors_per_run"]):
        if figures["mean_errors_per_run"]:
            print(f"  {s:24s} {figures['mean_errors_per_run']:5.2f} of {figures['images']:4d} ({figures['error_rate']:.1%})  "
                  + ", ".join(f"{k} {v}" for k, v in figures["taken_for"].items()))
    print(f"wrong in at least {args.show} runs:")
    for row in result["often_wrong"]:
        print(f"  {row['wrong_in']}  {row['image']:24s} {row['label']:12s} -> {' '.join(row['predicted'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
