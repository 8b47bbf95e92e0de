"""Cross-lab figures: a model on other labs' labelled cells, as shipped and after `bloodcell adapt`.

    .venv/bin/python benchmarks/cross_lab.py [SETS...] [--model default] [--pbc-test CURATED]
                                             [--draws 5] [--per-class 10] [--out benchmarks/results/cross_lab.json]

SETS are class-folder sets (``DIR/<class>/*.png``), or folders holding such sets (each
subfolder one lab); default: ``$BLOODCELL_DATA/foreign/jtsc``. For each set it reports:

- the model as given: accuracy, balanced accuracy, macro-F1, ECE, and its domain-shift verdict;
- after ``adapt`` with ``--per-class`` labelled cells per class (at most half of a class's
  cells, so every class keeps some to score), over ``--draws`` random draws, scored on the
  rest: mean and standard deviation of each figure, and adapt's own cross-validated estimate
  (``--folds``, as the command does by default);
- the same draws with the rest of the set given as unlabelled cells too (``adapt --data
  --unlabelled --lab-frequencies``: the lab's class frequencies), without cross-validation;
- with ``--reviewed N [N ...]``: a lab that reviews N of its cells in its own class mix (``predict
  --sort-into``, corrected) and adapts on them, over the same draws, scored on the rest;
- with ``--next N``: the cells to label next, as a lab would follow them. The first adaptation
  is also given the rest as unlabelled cells, so it lists the ``N`` it is least sure of
  (``to_label.csv``). Those ``N``, with their labels, join the labelled cells, and adapt runs
  again from the model. The same is done with ``N`` cells drawn at random. Both, and the
  first adaptation, are scored on the rest less both picks;
- after ``adapt --unlabelled`` on all of the set's images (labels unused), scored on the set;
- a set of whole fields with one white cell each (``--fields auto``: when plain evaluation says
  most of its images are fields) is scored as ``evaluate`` scores it, through the cell detector,
  beside the plain figure, and adapted on as ``adapt`` reads it: on each field's white cell;
- a set of boxed fields (any layout ``bloodcell evaluate`` reads as one: YOLO, Roboflow, Pascal
  VOC) whose boxes type their white cells is scored as ``evaluate`` scores it: the white-cell
  types of the cells found (misses counted as wrong), with the detector's AP50 per kind beside
  them. Its typed cells, cut out from the lab's boxes as ``count`` cuts a white cell, then get
  the adaptation figures and AUROC of a class-folder set (``as_given_cells``: the model on those
  crops). A boxed set without types (``WBC`` boxes) has no accuracy, but still gets the shift
  warning's figures on its boxed white cells (AUROC, the set's verdict) and the class mix of the
  model's answers, to set beside what the lab's donors should show. Boxes of classes bloodcell
  does not know (smudge cells, blasts) are left out, as ``evaluate --skip-unknown`` leaves them,
  and listed (``left_out``);
- the out-of-distribution AUROC of the PBC test split (``--pbc-test``: a curated PBC folder;
  its ``images/test``) against the set, how many random batches of 50 PBC test images
  are flagged (the target: none), and how often a batch of 50 is flagged when a tenth, a fifth,
  three tenths or half of it comes from the set (a lab only partly unlike the training lab).

Writes JSON (the machine's CPU included) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py

import numpy as np

HERE = Path(__file__).resolve().parent
FIGURES = ("accuracy", "balanced_accuracy", "macro_f1", "ece")


def class_folder_sets(paths: list[Path], class_names: list[str]) -> list[Path]:
    """Each path that holds class folders (named as the model's classes or as labs name them: 'Neutrophils',
    'EOS'); a path holding folders of such sets gives each of them."""
    from bloodcell.core.classes import canonical_class

    def holds_classes(folder: Path) -> bool:
        return any(child.is_dir() and canonical_class(child.name) in class_names for child in folder.iterdir())

    sets = []
    for path in paths:
        if holds_classes(path):
            sets.append(path)
        else:
            sets += [child for child in sorted(path.iterdir()) if child.is_dir() and holds_classes(child)]
    return sets


def files_by_class(root: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(f for f in d.iterdir() if f.is_file()) for d in sorted(root.iterdir()) if d.is_dir()}


def link_tree(target: Path, files: dict[str, list[Path]]) -> Path:
    for name, paths in files.items():
        if paths:
            (target / name).mkdir(parents=True, exist_ok=True)
            for path in paths:
                (target / name / path.name).symlink_to(path.resolve())
    return target


def known_classes_only(set_dir: Path, work: Path) -> tuple[Path, dict[str, int]]:
    """``set_dir`` itself, or where some of its class folders name none of the model's classes (smudge cells,
    blasts), a linked copy without them, and those folders' file counts (``evaluate --skip-unknown``)."""
    from bloodcell.core.classes import CLASS_NAMES
    from bloodcell.data import open_source

    source = open_source(set_dir, list(CLASS_NAMES), skip_unknown=True)
    if not source.ignored:
        return set_dir, {}
    files: dict[str, list[Path]] = {}
    for item in source.items:
        path = Path(item.path)
        files.setdefault(path.relative_to(set_dir).parts[0], []).append(path)
    return link_tree(work / "known", files), source.ignored


def figures(result: dict) -> dict:
    return {key: result[key] for key in FIGURES}


def summarise(rows: list[dict]) -> dict:
    return {key: {"mean": float(np.mean([r[key] for r in rows])), "sd": float(np.std([r[key] for r in rows]))}
            for key in FIGURES}


def ood_figures(model: str, pbc_test: Path | None, set_dir: Path | None, outside: np.ndarray | None = None) -> dict | None:
    """The shift warning's figures for ``set_dir``'s images, or for their scores already at hand (``outside``)."""
    from sklearn.metrics import roc_auc_score

    from bloodcell.data import decode_file
    from bloodcell.inference import load_predictor
    from bloodcell.models import batch_shift

    predictor = load_predictor(model)
    if not predictor.has_shift or pbc_test is None:
        return None

    def scores(root: Path) -> np.ndarray:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return predictor.scores([decode_file(f)[0] for f in files])[1]

    inside = scores(pbc_test)
    outside = scores(set_dir) if outside is None else outside
    rng = np.random.default_rng(0)
    batches = [batch_shift(inside[rng.choice(len(inside), 50, replace=False)])["flagged"] for _ in range(1000)]

    def mixed(share: float, n: int = 50, draws: int = 500) -> float:
        """How often a batch of PBC test images with ``share`` of this set's images mixed in is flagged: a lab
        only partly unlike the training lab's."""
        k = round(share * n)
        return float(np.mean([batch_shift(np.r_[inside[rng.choice(len(inside), n - k, replace=False)],
                                                outside[rng.choice(len(outside), k, replace=k > len(outside))]])["flagged"]
                              for _ in range(draws)]))

    return {"auroc": float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside])),
            "pbc_test_images": len(inside), "set_flagged": batch_shift(outside),
            "pbc_images_flagged": float((inside > 1).mean()), "pbc_batches_of_50_flagged": int(sum(batches)),
            "pbc_batches_tried": len(batches),
            "mixed_batches_of_50_flagged": {str(share): mixed(share) for share in (0.1, 0.2, 0.3, 0.5)}}


def label_next(args, root: Path, train: dict[str, list[Path]], rest: dict[str, list[Path]], draw: int) -> dict:
    """Label the cells the adapted model listed (``root/model/to_label.csv``) or as many at random, adapt
    again from the model, and score both and the first adaptation on the cells neither picked."""
    import csv

    from bloodcell.evaluation import evaluate_model
    from bloodcell.training.adapt import AdaptConfig
    from bloodcell.workflows import adapt_model

    with open(root / "model" / "to_label.csv") as handle:
        # Each listed file is a link in root/rest/<class>/: its folder is its true label.
        listed = [Path(row["image"]) for row in csv.DictReader(handle)]
    by_link = {(name, path.name): path for name, paths in rest.items() for path in paths}
    suggested = [(p.parent.name, by_link[(p.parent.name, p.name)]) for p in listed]
    pool = [(name, path) for name, paths in rest.items() for path in paths]
    order = np.random.default_rng(draw).permutation(len(pool))
    randomly = [pool[i] for i in order[: len(suggested)]]
    taken = {path for _, path in suggested + randomly}
    common = {name: [p for p in paths if p not in taken] for name, paths in rest.items()}
    link_tree(root / "common", common)
    result = {"labelled_only": figures(evaluate_model(root / "model", root / "common", root / "eval-common", fields=False)),
              "picked": {arm: sorted({name for name, _ in picks}) for arm, picks in
                         (("suggested", suggested), ("random", randomly))},
              "common_cells": sum(len(v) for v in common.values())}
    for arm, picks in (("suggested", suggested), ("random", randomly)):
        labelled = {name: list(paths) for name, paths in train.items()}
        for name, path in picks:
            labelled.setdefault(name, []).append(path)
        link_tree(root / f"train-{arm}", labelled)
        adapt_model(args.model, root / f"model-{arm}", root / f"train-{arm}", None, AdaptConfig(steps=args.steps, seed=draw),
                    folds=0, export=False, log=lambda line: None)
        result[arm] = figures(evaluate_model(root / f"model-{arm}", root / "common", root / f"eval-{arm}", fields=False))
    print(f"  draw {draw}: {len(suggested)} more cells, on {result['common_cells']} common cells: "
          f"{result['labelled_only']['accuracy']:.3f} -> suggested {result['suggested']['accuracy']:.3f}, "
          f"random {result['random']['accuracy']:.3f}", flush=True)
    return result


def bench_set(set_dir: Path, args, work: Path) -> dict:
    from bloodcell.evaluation import evaluate_model
    from bloodcell.inference.count import mostly_fields
    from bloodcell.training.adapt import AdaptConfig
    from bloodcell.workflows import adapt_model

    quiet = lambda line: None
    report: dict = {"set": str(set_dir)}
    set_dir, left_out = known_classes_only(set_dir, work)
    if left_out:
        report["left_out"] = left_out
        print(f"{Path(report['set']).name}: class folders the model does not know, left out: "
              + ", ".join(f"{name} ({count})" for name, count in left_out.items()), flush=True)
    files = files_by_class(set_dir)
    report["images"] = {k: len(v) for k, v in files.items()}
    start = time.perf_counter()
    plain = evaluate_model(args.model, set_dir, work / "as_given", fields=False, check_fields=args.fields == "auto")
    report["as_given"] = {**figures(plain), "domain_shift": plain.get("domain_shift")}
    field_like = plain.get("field_like")
    fields = args.fields == "yes" or (args.fields == "auto" and field_like is not None and mostly_fields(
        (field_like["whole_fields"], field_like["images_looked_at"])))
    if fields:
        # Whole fields, one white cell each: read as `bloodcell count` and `evaluate --fields` read them.
        # Adaptation learns from cells, not fields, so it is left out for such a set.
        found = evaluate_model(args.model, set_dir, work / "as_given_fields", fields=True)
        report["read_as"] = "fields"
        report["as_given_plain"] = report["as_given"]
        report["as_given"] = {**figures(found), "domain_shift": found.get("domain_shift"),
                              "white_cell_found": found["fields"]["white_cell_found"]}
        print(f"{Path(report['set']).name}: whole fields (plain {report['as_given_plain']['accuracy']:.3f}); through the "
              f"detector {report['as_given']['accuracy']:.3f}; adaptation learns from their white cells", flush=True)
    else:
        report["read_as"] = "cells"
        print(f"{Path(report['set']).name}: as given {report['as_given']['accuracy']:.3f}", flush=True)
    report["ood"] = ood_figures(args.model, args.pbc_test, set_dir)
    draws, combined, following = [], [], []
    for draw in range(args.draws):
        rng = random.Random(draw)
        train, rest = {}, {}
        for name, paths in files.items():
            shuffled = paths[:]
            rng.shuffle(shuffled)
            k = min(args.per_class, len(shuffled) // 2)
            train[name], rest[name] = shuffled[:k], shuffled[k:]
        root = work / f"draw{draw}"
        link_tree(root / "train", train)
        link_tree(root / "rest", rest)
        t0 = time.perf_counter()
        # The rest as unlabelled cells changes only the shift statistics and, with --next, lists the
        # cells to label next; the labelled cells alone teach the classes.
        # A set of whole fields: adapt learns from their white cells, cut out as evaluate cuts them.
        summary = adapt_model(args.model, root / "model", root / "train", root / "rest" if args.next else None,
                              AdaptConfig(steps=args.steps, seed=draw), folds=args.folds, export=False, log=quiet,
                              suggest=args.next, fields=fields)
        seconds = time.perf_counter() - t0
        scored = figures(evaluate_model(root / "model", root / "rest", root / "eval", fields=fields))
        draws.append({**scored, "adapt_seconds": round(seconds, 1), "labelled": summary["labelled_per_class"],
                      "cross_validated": summary.get("cross_validated")})
        # The same labelled cells, with the rest of the set as the lab's unlabelled cells (their class
        # frequencies); without cross-validation, to keep the benchmark's time.
        t0 = time.perf_counter()
        adapt_model(args.model, root / "model-both", root / "train", root / "rest",
                    AdaptConfig(steps=args.steps, seed=draw, lab_frequencies=True), folds=0, export=False, log=quiet,
                    fields=fields)
        both = figures(evaluate_model(root / "model-both", root / "rest", root / "eval-both", fields=fields))
        combined.append({**both, "adapt_seconds": round(time.perf_counter() - t0, 1)})
        print(f"  draw {draw}: adapted {scored['accuracy']:.3f} ({seconds:.0f} s); with the rest unlabelled "
              f"{both['accuracy']:.3f}", flush=True)
        if args.next and not fields:  # (the cells to label next are single cells)
            following.append(label_next(args, root, train, rest, draw))
    if draws:
        report["labelled"] = {"per_class": args.per_class, "draws": draws, **summarise(draws)}
        report["labelled_and_rest_unlabelled"] = {"per_class": args.per_class, "draws": combined, **summarise(combined)}
    if following:
        report["next"] = {"cells": args.next, "draws": following,
                          **{arm: summarise([d[arm] for d in following]) for arm in ("labelled_only", "suggested", "random")}}
    if args.reviewed and not fields:
        report["reviewed"] = {str(n): reviewed(args, files, n, work / f"reviewed{n}") for n in args.reviewed}
    if args.unlabelled:
        t0 = time.perf_counter()
        adapt_model(args.model, work / "unlabelled", None, set_dir, AdaptConfig(steps=args.steps), export=False,
                    log=quiet, fields=fields)
        report["unlabelled"] = {**figures(evaluate_model(work / "unlabelled", set_dir, work / "unlabelled-eval", fields=fields)),
                                "adapt_seconds": round(time.perf_counter() - t0, 1)}
        print(f"  unlabelled: {report['unlabelled']['accuracy']:.3f}", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def reviewed(args, files: dict[str, list[Path]], count: int, work: Path) -> dict:
    """A lab that reviews ``count`` of its cells (`predict --sort-into`, then corrects them) and adapts on
    them: the cells drawn at random from the whole set, so in the lab's own class mix, not per class;
    ``--draws`` draws, each scored on the rest of the set."""
    from bloodcell.evaluation import evaluate_model
    from bloodcell.training.adapt import AdaptConfig
    from bloodcell.workflows import adapt_model

    pool = [(name, path) for name, paths in files.items() for path in paths]
    draws = []
    for draw in range(args.draws):
        picked = pool[:]
        random.Random(draw).shuffle(picked)
        train: dict[str, list[Path]] = {}
        rest: dict[str, list[Path]] = {}
        for index, (name, path) in enumerate(picked):
            (train if index < count else rest).setdefault(name, []).append(path)
        root = work / f"draw{draw}"
        link_tree(root / "train", train)
        link_tree(root / "rest", rest)
        adapt_model(args.model, root / "model", root / "train", None, AdaptConfig(steps=args.steps, seed=draw),
                    folds=0, export=False, log=lambda line: None)
        draws.append({**figures(evaluate_model(root / "model", root / "rest", root / "eval", fields=False)),
                      "labelled": {name: len(paths) for name, paths in train.items()}})
        print(f"  {count} cells reviewed, draw {draw}: {draws[-1]['accuracy']:.3f} on the rest", flush=True)
    return {"cells": count, "draws": draws, **summarise(draws)}


def bench_boxed(set_dir: Path, args, work: Path) -> dict:
    """A lab's boxed fields, read as `bloodcell count` reads them; with typed white cells, their accuracy."""
    from bloodcell.evaluation.boxed_fields import evaluate_field_set

    result = evaluate_field_set(args.model, set_dir, work, skip_unknown=True)  # boxes of unknown classes left out
    types = result.get("types")
    detection = {kind: result["detection"][kind]["ap50"] for kind in ("white_cell", "red_cell", "platelet")}
    if types is None:
        return bench_untyped(set_dir, args, result, detection)
    print(f"{set_dir.name}: boxed fields, {types['typed_cells']} typed white cells, {types['found']} found; AP50 "
          + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in detection.items()))
    as_given = {"accuracy": types["accuracy"], "balanced_accuracy": types["balanced_accuracy"],
                "macro_f1": types["macro_f1"], "ece": types["ece_where_found"]}
    report = {"set": str(set_dir), "read_as": "boxed_fields", "fields": result["fields"], "as_given": as_given,
              "types": types, "detection": detection, "white_cell_recall": result["detection"]["white_cell"]["recall"],
              "domain_shift": result.get("domain_shift")}
    if result.get("left_out"):
        report["left_out"] = result["left_out"]
    # The typed cells, cut out as `count` cuts a white cell (from the lab's own boxes), as class folders: the
    # adaptation figures and the out-of-distribution AUROC of a class-folder set, on the crops count would classify.
    cells = typed_cells_as_folders(set_dir, work / "cells")
    print(f"  {sum(cells.values())} typed white cells cut out as count cuts them "
          f"({', '.join(f'{k} {v}' for k, v in cells.items())}); adaptation on them:", flush=True)
    crops = bench_set(work / "cells", argparse.Namespace(**{**vars(args), "fields": "no"}), work / "cells-bench")
    report["as_given_cells"] = crops["as_given"]
    for key in ("labelled", "labelled_and_rest_unlabelled", "next", "unlabelled", "ood"):
        if key in crops:
            report[key] = crops[key]
    return report


def bench_untyped(set_dir: Path, args, result: dict, detection: dict) -> dict:
    """A lab's boxed fields without white-cell types: no accuracy, but the shift warning's figures (the AUROC of
    the PBC test split against the lab's boxed white cells, cut out as `count` cuts them; the set's verdict) and
    the class mix of the model's answers, to set beside what the lab's donors should show."""
    from bloodcell.inference import load_predictor
    from bloodcell.inference.batch import prediction_row
    from bloodcell.inference.count import boxed_white_cells, white_cell_to_check

    crops = [crop for crop, _, _ in boxed_white_cells(set_dir, skip_unknown=True)]
    predictor = load_predictor(args.model)
    probs, ood = predictor.scores(crops)
    rows = [prediction_row("", p, predictor.class_names, 0.7, None if ood is None else float(o))
            for p, o in zip(probs, ood if ood is not None else [None] * len(probs))]
    answers = {name: round(float((probs.argmax(1) == i).mean()), 4) for i, name in enumerate(predictor.class_names)}
    print(f"{set_dir.name}: boxed fields without white-cell types, {len(crops)} boxed white cells; answers: "
          + ", ".join(f"{k} {v:.2f}" for k, v in answers.items()), flush=True)
    return {"set": str(set_dir), "read_as": "boxed_fields_untyped", "fields": result["fields"], "white_cells": len(crops),
            "detection": detection, "white_cell_recall": result["detection"]["white_cell"]["recall"],
            "domain_shift": result.get("domain_shift"), "answers": answers,
            "to_check_share": round(sum(map(white_cell_to_check, rows)) / max(1, len(rows)), 4),
            "mean_confidence": round(float(probs.max(1).mean()), 4), "ood": None if ood is None else ood_figures(args.model, args.pbc_test, None, ood),
            **({"left_out": result["left_out"]} if result.get("left_out") else {})}


def typed_cells_as_folders(set_dir: Path, out: Path) -> dict[str, int]:
    """Each typed white-cell box of a boxed field set, cut out as `bloodcell count` cuts a white cell it found,
    saved as ``out/<type>/<field>_<n>.png``; the number per type."""
    from PIL import Image

    from bloodcell.inference.count import boxed_white_cells

    counts: dict[str, int] = {}
    for crop, kind, origin in boxed_white_cells(set_dir, typed_only=True, skip_unknown=True):
        (out / kind).mkdir(parents=True, exist_ok=True)
        field, _, box = origin.rpartition("#")
        Image.fromarray(crop).save(out / kind / f"{Path(field).stem}_{box}.png")
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def main() -> None:
    data = Path(os.environ.get("BLOODCELL_DATA", HERE.parent.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="*", type=Path, default=[data / "foreign" / "jtsc"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--pbc-test", type=Path, default=None, help="a curated PBC folder (its images/test is used)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--folds", type=int, default=3, help="adapt's cross-validation (its estimate and temperature); 0: none")
    parser.add_argument("--next", type=int, default=0, help="also label the N cells adapt lists next, against N at random; 0: off")
    parser.add_argument("--reviewed", type=int, nargs="*", default=[],
                        help="also adapt on N cells drawn at random in the lab's own mix (a review of predict "
                             "--sort-into's copies), for each N given; --draws draws each, scored on the rest")
    parser.add_argument("--unlabelled", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fields", choices=("auto", "yes", "no"), default="auto",
                        help="read a set as whole fields (one white cell each) through the detector; auto: when "
                             "plain evaluation finds most of its images are fields")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cross_lab.json")
    args = parser.parse_args()
    if args.pbc_test is not None:
        args.pbc_test = args.pbc_test / "images" / "test" if (args.pbc_test / "images" / "test").is_dir() else args.pbc_test

    from bloodcell.core.classes import CLASS_NAMES
    from bloodcell.data.fields import is_field_set

    boxed = [p for path in args.sets for p in ([path] if is_field_set(path) else sorted(path.iterdir()) if path.is_dir() else [])
             if is_field_set(p)]
    sets = class_folder_sets([p for p in args.sets if not is_field_set(p)], CLASS_NAMES)
    if not sets and not boxed:
        sys.exit(f"no class-folder sets or boxed field sets under {', '.join(map(str, args.sets))}")
    results = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "cpu": cpu_name(), "cores": os.cpu_count(), "command": " ".join(sys.argv), "sets": []}
    with tempfile.TemporaryDirectory() as tmp:
        for index, set_dir in enumerate(sets):
            results["sets"].append(bench_set(set_dir, args, Path(tmp) / str(index)))
        for index, set_dir in enumerate(boxed):
            results["sets"].append(bench_boxed(set_dir, args, Path(tmp) / f"boxed{index}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\n{'set':<16}{'as given':>10}{'balanced':>10}{'ECE':>7}{f'adapted({args.per_class}/cl)':>18}{'+ rest unl.':>14}"
          f"{'unlabelled':>12}{'AUROC':>8}")
    for r in results["sets"]:
        labelled = r.get("labelled")
        adapted = f"{labelled['accuracy']['mean']:.3f}±{labelled['accuracy']['sd']:.3f}" if labelled else "-"
        both = r.get("labelled_and_rest_unlabelled")
        both = f"{both['accuracy']['mean']:.3f}±{both['accuracy']['sd']:.3f}" if both else "-"
        unl = f"{r['unlabelled']['accuracy']:.3f}" if "unlabelled" in r else "-"
        auroc = f"{r['ood']['auroc']:.3f}" if r.get("ood") else "-"
        name = Path(r["set"]).name + {"fields": " (fields)", "boxed_fields": " (boxed)",
                                      "boxed_fields_untyped": " (boxed, no types)"}.get(r.get("read_as"), "")
        given = r.get("as_given")
        if given is None:  # no types: the shift warning's figures only
            print(f"{name:<16}{'-':>10}{'-':>10}{'-':>7}{adapted:>18}{both:>14}{unl:>12}{auroc:>8}")
            continue
        print(f"{name:<16}{given['accuracy']:>10.3f}{given['balanced_accuracy']:>10.3f}"
              f"{'-' if given['ece'] is None else format(given['ece'], '.3f'):>7}"
              f"{adapted:>18}{both:>14}{unl:>12}{auroc:>8}")
        for cells, rev in r.get("reviewed", {}).items():
            print(f"{'':<16}{cells} cells reviewed, in the lab's mix, adapted on: "
                  f"{rev['accuracy']['mean']:.3f}±{rev['accuracy']['sd']:.3f} on the rest")
        if "next" in r:
            n = r["next"]
            print(f"{'':<16}{n['cells']} cells to label next, on the cells neither picked: "
                  + ", ".join(f"{arm} {n[arm]['accuracy']['mean']:.3f}±{n[arm]['accuracy']['sd']:.3f}"
                              for arm in ("labelled_only", "suggested", "random")))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
