"""``bloodcell adapt``: a model adapted to one lab, from a few of its labelled cells or many unlabelled ones.

Labelled cells fine-tune the network (:func:`bloodcell.training.adapt.finetune`); unlabelled
cells beside them become the lab's familiar cells for the shift warning, and on request
(``lab_frequencies``) give the lab's class frequencies (label shift; measured neutral so far);
unlabelled cells alone shift the last layer's bias so the lab's mean feature meets the
training lab's (:func:`bloodcell.training.adapt.align_feature_mean`).

The result is a model directory like any run's (best.safetensors, model.json, shift.safetensors,
model.onnx), which every ``--model`` accepts. Its contract records what it was adapted on.
"""

from __future__ import annotations

import copy
import csv
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..core.classes import TO_CHECK_FOLDER
from ..core.contract import write_contract
from ..core.errors import BloodcellError, ImageReadError, MissingExtraError
from ..data import decode_file, open_source, preprocess
from ..data.sources import renamed_line
from ..data.splits import load_split
from ..evaluation.calibration import fit_temperature
from ..evaluation.metrics import expected_calibration_error
from ..evaluation.shift import model_features
from ..inference import DEFAULT_MODEL_DIR, collect_inputs
from ..models import (
    SHIFT_FILE,
    ShiftHead,
    load_model,
    load_shift_head,
    save_checkpoint,
    save_shift_head,
)
from ..training.adapt import (
    AdaptConfig,
    align_feature_mean,
    estimate_class_prior,
    finetune,
    least_certain,
    shift_class_prior,
)

if TYPE_CHECKING:
    from ..inference.detect import CellDetector

MIN_PER_CLASS = 5
TO_LABEL_FILE = "to_label.csv"
LABELS_TO_REVIEW_FILE = "labels_to_review.csv"


@dataclass
class LabCells:
    """A lab's cells prepared as the model's input (N, 3, size, size), where each came from (a file, or a field
    and its box), their labels (None when unlabelled), and whether the images were read as whole fields."""

    images: torch.Tensor
    origins: list[str]
    labels: np.ndarray | None = None
    as_fields: bool = False
    counts: dict[str, int] = field(default_factory=dict)  # labelled cells per class


def model_directory(model: str | Path) -> Path:
    """The run directory holding a model's PyTorch weights ('default': the shipped model)."""
    path = DEFAULT_MODEL_DIR if str(model) == "default" else Path(model)
    if path.suffix == ".onnx":
        raise BloodcellError(f"{path}: adapting needs the PyTorch weights; pass the run directory beside it")
    if path.is_file():
        path = path.parent
    if not (path / "model.json").is_file() or not (path / "best.safetensors").is_file():
        raise BloodcellError(f"{path}: not a model directory (needs model.json and best.safetensors)")
    return path


def field_cells(path: Path, size: int, framing: dict | None, log: Callable[[str], None],
                typed_only: bool, skip_unknown: bool = False) -> tuple[list[np.ndarray], list[str], list[str]]:
    """The white cells boxed in a lab's field set, cut out as ``bloodcell count`` cuts them and prepared as
    the model's input: (images, types ("" where a box is untyped), where each came from). ``typed_only``:
    only the boxes whose class is a white-cell type."""
    from ..inference.count import boxed_white_cells

    images, types, origins = [], [], []
    for crop, kind, origin in boxed_white_cells(path, typed_only, lambda name, why: log(f"skipped {name}: {why}"),
                                                skip_unknown):
        images.append(preprocess(crop, size, framing))
        types.append(kind)
        origins.append(origin)
    log(f"{len(images)} white cells cut from the boxed fields in {path} (as `bloodcell count` cuts them)")
    return images, types, origins


def labelled_field_cells(source, class_names: list[str], size: int, framing: dict | None, detector: str | Path | CellDetector,
                         log: Callable[[str], None], origins: list[str], chunk: int = 16
                         ) -> tuple[torch.Tensor, np.ndarray]:
    """Class folders of whole fields, one white cell each: the white cell of each, found by ``detector`` and
    cut out as ``count`` cuts it (what ``evaluate`` scores on such fields). A field where none is found is
    left out, with a line: adaptation learns from cells. ``origins`` receives each cell's file, in order."""
    from ..inference.count import source_white_cells
    from ..inference.detect import load_detector

    remap = [class_names.index(c) for c in source.class_names]
    images, labels = [], []
    for item, cut in source_white_cells(source, load_detector(detector), chunk):
        if isinstance(cut, Exception) or cut[1] is None:
            log(f"skipped {item.path}: {cut if isinstance(cut, Exception) else 'no white cell found in this field'}")
            continue
        images.append(preprocess(cut[0], size, framing))
        labels.append(remap[item.label])
        origins.append(str(item.path))
    if not images:
        raise BloodcellError(f"{source.root}: no white cell found in these fields")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), np.array(labels, np.int64)


def read_as_fields(paths: list[str], fields: bool | None, detector: str | Path | CellDetector, where: Path,
                   log: Callable[[str], None]) -> bool:
    """``fields`` as given, or (None) whether a sample of ``paths`` is mostly whole fields, said in a line."""
    if fields is not None:
        return fields
    from ..inference.count import count_field_like, mostly_fields

    counted = count_field_like(paths, detector)
    if mostly_fields(counted):
        log(f"{where}: {counted[0]} of {counted[1]} images looked at are whole fields; their white cells are cut out "
            "as `bloodcell count` cuts them (--no-fields reads each image as one cell)")
        return True
    return False


def load_labelled(path: Path, class_names: list[str], size: int, framing: dict | None,
                  log: Callable[[str], None], skip_unknown: bool = False, fields: bool | None = False,
                  detector: str | Path | CellDetector = "default") -> LabCells:
    """The lab's labelled cells, prepared as the model's input: class folders of cells, class folders of whole
    fields holding one white cell each (``fields``: True, or None to look first), or boxed fields whose
    white-cell boxes are typed."""
    from ..data.fields import is_field_set

    origins: list[str] = []
    as_fields = False
    if is_field_set(path):  # the lab's own fields, their white cells boxed and typed
        images, types, where = field_cells(path, size, framing, log, typed_only=True, skip_unknown=skip_unknown)
        unknown = sorted({t for t in types if t not in class_names})
        if unknown:
            log(f"not classes of this model, left out: {', '.join(unknown)}")
        keep = [i for i, t in enumerate(types) if t in class_names]
        if not keep:
            raise BloodcellError(f"{path}: no white cell typed with one of the model's classes "
                                 "(boxes named neutrophil, lymphocyte...; WBC boxes carry no type)")
        tensor = torch.from_numpy(np.stack([images[i] for i in keep])).permute(0, 3, 1, 2).contiguous()
        labels = np.array([class_names.index(types[i]) for i in keep], np.int64)
        origins = [where[i] for i in keep]
    else:
        # 'Neutrophils', 'EOS' ... read as the model's classes; count --crops's to_check/ is what the lab did not sort
        source = open_source(path, list(class_names), ignore=(TO_CHECK_FOLDER,), skip_unknown=skip_unknown)
        if source.renamed:
            log(renamed_line(source.renamed))
        for folder, files in source.ignored.items():
            why = "not sorted into a class folder" if folder == TO_CHECK_FOLDER else "not a class of this model"
            log(f"{folder}/: {files} cell(s) {why}, left out")
        as_fields = read_as_fields([item.path for item in source.items], fields, detector, path, log)
        if as_fields:
            tensor, labels = labelled_field_cells(source, class_names, size, framing, detector, log, origins)
        else:
            split = load_split(source, class_names, size, framing=framing)
            for bad, why in split.unreadable:
                log(f"skipped {bad}: {why}")
            tensor, labels = split.images, split.labels.numpy()
            origins = list(split.paths)
    counts = {class_names[c]: int((labels == c).sum()) for c in np.unique(labels)}
    for name, count in counts.items():
        if count < MIN_PER_CLASS:
            log(f"warning: only {count} labelled {name} cell(s) in {path}; {MIN_PER_CLASS} or more per class "
                "make adaptation reliable")
    missing = [c for c in class_names if c not in counts]
    if missing:
        log(f"not labelled here (kept as trained): {', '.join(missing)}")
    return LabCells(tensor, origins, labels, as_fields, counts)


def found_cells(images: list[np.ndarray], names: list[str], finder, size: int,
                framing: dict | None) -> tuple[list[np.ndarray], list[str]]:
    """Every white cell ``finder`` (a :class:`~bloodcell.inference.detect.CellDetector`) finds in whole fields,
    cut out and prepared as ``count`` does it."""
    from ..data.fields import KINDS
    from ..inference.count import CROP_CONTEXT, fields_of_view, square_crop

    cells, origins = [], []
    views, painted = fields_of_view(images)
    for image, name, found in zip(painted, names, finder.detect_batch(images, views)):
        for box in found.boxes.xyxy[found.boxes.kinds == KINDS.index("white_cell")]:
            cells.append(preprocess(square_crop(image, box, CROP_CONTEXT), size, framing))
            origins.append(f"{name}#{','.join(f'{v:.0f}' for v in box)}")
    return cells, origins


def load_unlabelled(path: Path, size: int, framing: dict | None, log: Callable[[str], None],
                    fields: bool | None = False, detector: str | Path | CellDetector = "default") -> LabCells:
    """The readable images under ``path``, prepared as the model's input, with their file paths. For a boxed
    field set: every white cell boxed in it, typed or not; with ``fields``: every white cell ``detector``
    finds in the images, which are whole fields (None: look at a sample first)."""
    from ..data.fields import is_field_set
    from ..inference.count import count_field_like, mostly_fields

    if is_field_set(path):
        images, _, origins = field_cells(path, size, framing, log, typed_only=False)
        if not images:
            raise BloodcellError(f"{path}: no white cells boxed in these fields")
        return LabCells(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), origins)
    items, bad = collect_inputs([path])
    asked = fields
    fields = read_as_fields([str(entry) for _, entry in items if not isinstance(entry, tuple)], fields, detector, path, log)
    images, files = [], []
    chunk: list[tuple[np.ndarray, str]] = []
    if fields:
        from ..inference.detect import load_detector

        finder = load_detector(detector)  # once, for every chunk of fields

    def flush() -> None:
        cells, origins = found_cells([c[0] for c in chunk], [c[1] for c in chunk], finder, size, framing)
        images.extend(cells)
        files.extend(origins)
        chunk.clear()

    fields_read = 0
    for name, entry in items:
        if isinstance(entry, tuple):
            bad.append((name, "arrays are not read as unlabelled cells; pass a folder of images"))
            continue
        try:
            decoded = decode_file(entry)[0]
        except (ImageReadError, BloodcellError) as exc:
            bad.append((name, str(exc)))
            continue
        if fields:
            chunk.append((decoded, str(entry)))
            fields_read += 1
            if len(chunk) == 8:
                flush()
        else:
            images.append(preprocess(decoded, size, framing))
            files.append(str(entry))
    if chunk:
        flush()
    for name, reason in bad:
        log(f"skipped {name}: {reason}")
    if fields:
        log(f"{len(images)} white cells found in {fields_read} fields in {path} (cut out as `bloodcell count` cuts them)")
    elif asked is False and mostly_fields(count_field_like(files)):
        log(f"warning: {path} looks like whole fields, not single cells; without --no-fields adapt learns from the "
            "white cells the detector finds in them")
    if not images:
        raise BloodcellError(f"{path}: no readable images" if not fields else f"{path}: no white cell found in these fields")
    return LabCells(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), files, as_fields=bool(fields))


@torch.no_grad()
def logits_of(net, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    net.eval()
    return torch.cat([net(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def cross_validate(net, images: torch.Tensor, labels: np.ndarray, config: AdaptConfig, folds: int,
                   log: Callable[[str], None]) -> tuple[dict, torch.Tensor] | None:
    """Held-out logits for every labelled cell: adapt on the other folds, score this one."""
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:  # not asked for
        return None
    folds = min(folds, len(labels))
    if folds < 2:
        log("too few labelled cells for a cross-validated estimate")
        return None
    held_out = torch.zeros(len(labels), logits_of(net, images[:1]).shape[1])
    with warnings.catch_warnings():  # classes with fewer cells than folds are allowed
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedKFold(folds, shuffle=True, random_state=config.seed)
        for index, (train, test) in enumerate(splitter.split(np.zeros(len(labels)), labels), 1):
            fold_net = copy.deepcopy(net)
            finetune(fold_net, images[train], labels[train], config)
            held_out[test] = logits_of(fold_net, images[test])
            log(f"fold {index}/{folds}: {(held_out[test].argmax(1).numpy() == labels[test]).mean():.1%} "
                f"on {len(test)} held-out cells")
    predicted = held_out.argmax(1).numpy()
    present = np.unique(labels)
    estimate = {"folds": folds, "accuracy": float((predicted == labels).mean()),
                "balanced_accuracy": float(np.mean([(predicted[labels == c] == c).mean() for c in present]))}
    return estimate, held_out


def adapt_model(model: str | Path, out: str | Path, labelled: str | Path | None = None,
                unlabelled: str | Path | None = None, config: AdaptConfig | None = None, folds: int = 3,
                export: bool = True, log: Callable[[str], None] = print, suggest: int = 20,
                fields: bool | None = None, detector: str | Path | CellDetector = "default", skip_unknown: bool = False) -> dict:
    """Adapt ``model`` to a lab and write the adapted model directory ``out``; returns a summary.

    ``skip_unknown``: class folders of ``labelled`` naming none of the model's classes are left out
    (with a line) instead of refused.

    With unlabelled cells, ``out/to_label.csv`` lists the ``suggest`` of them the adapted model is
    least sure of: the cells whose labels would teach the next adaptation most. ``fields``: the images
    are whole fields (the labelled ones one white cell each), and their cells are the white cells
    ``detector`` finds, cut out as ``count`` cuts them; False: each image is one cell; None (the
    default): a sample of each folder is looked at with the detector first, as ``evaluate`` does.
    """
    if labelled is None and unlabelled is None:
        raise BloodcellError("adapt needs --data (class folders of the lab's labelled cells) or --unlabelled DIR")
    config = config or AdaptConfig()
    start = time.perf_counter()
    source_dir = model_directory(model)
    out = Path(out)
    if out.resolve() == source_dir.resolve():
        raise BloodcellError(f"{out}: choose another folder; adapt never overwrites the model it starts from")
    net, contract = load_model(source_dir)
    size, framing, names = contract.image_size, contract.framing, contract.class_names
    if fields is not False:
        from ..inference.detect import load_once

        detector = load_once(detector)  # one session for every look at a sample and every reading of fields
    images = labels = None
    counts: dict[str, int] = {}
    labelled_files: list[str] = []
    pool, pool_files = None, []
    labelled_fields = unlabelled_fields = False
    if labelled is not None:
        lab = load_labelled(Path(labelled), names, size, framing, log, skip_unknown, fields, detector)
        images, labels, counts, labelled_files, labelled_fields = lab.images, lab.labels, lab.counts, lab.origins, lab.as_fields
    if unlabelled is not None:
        lab = load_unlabelled(Path(unlabelled), size, framing, log, fields, detector)
        pool, pool_files, unlabelled_fields = lab.images, lab.origins, lab.as_fields
    log(f"adapting {source_dir} on " + " and ".join(
        part for part in (f"{len(labels)} labelled cells ({', '.join(f'{k} {v}' for k, v in counts.items())})"
                          if labels is not None else "", f"{len(pool)} unlabelled cells" if pool is not None else "")
        if part))
    summary: dict = {"source_model": str(source_dir), "labelled": str(labelled) if labelled else None,
                     "unlabelled": str(unlabelled) if unlabelled else None, "labelled_per_class": counts,
                     "unlabelled_images": len(pool) if pool is not None else 0,
                     "labelled_fields": labelled_fields, "unlabelled_fields": unlabelled_fields,
                     "config": config.model_dump(mode="json")}
    temperature = contract.temperature
    held_out_probs = None
    if labels is not None:
        before = logits_of(net, images).argmax(1).numpy()
        summary["before"] = {"accuracy": float((before == labels).mean())}
        validated = cross_validate(net, images, labels, config, folds, log)
        if validated is not None:
            estimate, held_out = validated
            # The temperature of the adapted model, fitted on cells it had not seen.
            temperature = fit_temperature(held_out, torch.from_numpy(labels))
            probs = torch.softmax(held_out / temperature, 1).numpy()
            estimate["ece"] = float(expected_calibration_error(probs, labels))
            summary["cross_validated"] = estimate
            log(f"cross-validated estimate on this lab's labelled cells: accuracy {estimate['accuracy']:.1%}, "
                f"balanced {estimate['balanced_accuracy']:.1%} ({estimate['folds']} folds; before adapting "
                f"{summary['before']['accuracy']:.1%})")
            held_out_probs = probs  # written beside the model: the labelled cells the other folds dispute
        summary["fit"] = finetune(net, images, labels, config)
        if pool is not None and not config.lab_frequencies:
            log("the unlabelled cells become this lab's familiar cells for the shift warning; the labelled ones teach "
                "the classes")
        if pool is not None and config.lab_frequencies:
            # The labelled cells were drawn class-balanced; the unlabelled ones say how often each class
            # comes in this lab (label shift, Saerens et al. 2002): neutrophils far more than basophils.
            uniform = np.full(len(names), 1 / len(names))
            probs = torch.softmax(logits_of(net, pool) / temperature, 1).numpy()
            prior = estimate_class_prior(probs, uniform)
            shift_class_prior(net, prior, uniform, contract.subclasses.parents if contract.subclasses else None)
            summary["class_prior"] = {name: round(float(p), 4) for name, p in zip(names, prior)}
            log("class frequencies estimated on the unlabelled cells: " + ", ".join(
                f"{name} {p:.0%}" for name, p in zip(names, prior) if p > 0.01))
    else:
        head = load_shift_head(source_dir)
        if head is None:
            raise BloodcellError(f"{source_dir}: adapting on unlabelled cells needs the training lab's statistics "
                                 "(shift.safetensors); run `bloodcell calibrate` on the model first")
        summary["fit"] = align_feature_mean(net, pool, head.means.mean(0))
    out.mkdir(parents=True, exist_ok=True)
    if held_out_probs is not None:
        summary["labels_to_review"] = write_labels_to_review(out / LABELS_TO_REVIEW_FILE, held_out_probs, labels,
                                                             labelled_files, names)
        if summary["labels_to_review"]["cells"]:
            log(f"{summary['labels_to_review']['cells']} labelled cell(s) were called another class by a model "
                f"adapted on the others: check their labels ({out / LABELS_TO_REVIEW_FILE})")
    save_checkpoint(out / "best.safetensors", net.state_dict(), {"adapted_from": str(source_dir)})
    adapted = {key: summary[key] for key in ("source_model", "labelled", "unlabelled", "labelled_per_class",
                                              "unlabelled_images")}
    adapted["mode"] = "+".join(m for m, given in (("labelled", labelled), ("unlabelled", unlabelled)) if given)
    for key in ("labelled_fields", "unlabelled_fields"):
        if summary[key]:
            adapted[key] = True  # the white cells the detector found in whole fields, cut out as count cuts them
    if "cross_validated" in summary:
        adapted["cross_validated_accuracy"] = summary["cross_validated"]["accuracy"]
    if "class_prior" in summary:
        adapted["class_prior"] = summary["class_prior"]
    summary["shift"] = adapt_shift(source_dir, contract.shift, out, net, images, labels, pool)
    shift = {**(contract.shift or {}), **summary["shift"]} if summary["shift"] else contract.shift
    write_contract(out, contract.model_copy(update={"temperature": float(temperature), "adapted": adapted,
                                                    "shift": shift}))
    if pool is not None and suggest > 0:
        summary["to_label"] = write_to_label(out / TO_LABEL_FILE, net, pool, pool_files, names, temperature, suggest)
        log(f"the {summary['to_label']['cells']} unlabelled cells worth labelling next (least certain first): "
            f"{out / TO_LABEL_FILE}")
    summary["seconds"] = round(time.perf_counter() - start, 1)
    if export:
        from ..inference.export import export_onnx

        try:
            # Already framed and resized; the check only compares ONNX Runtime with PyTorch on the same input.
            check = [image.permute(1, 2, 0).numpy() for image in (images if images is not None else pool)[:64]]
            summary["export"] = export_onnx(out, out / "model.onnx", check)
        except MissingExtraError as exc:
            log(f"not exported to ONNX: {exc}")
    (out / "adapt.json").write_text(json.dumps(summary, indent=2))
    log(f"adapted model written to {out} in {summary['seconds']:.0f} s")
    return summary


def write_labels_to_review(path: Path, probs: np.ndarray, labels: np.ndarray, files: list[str],
                           names: list[str]) -> dict:
    """``path``: the labelled cells whose cross-validated answer (from a model adapted on the other folds) is
    another class, least likely under their own label first (cleanlab's "predicted_neq_given" rule, ranked by
    self-confidence). A wrong label teaches the adapted model the wrong class; a right one here is a cell
    the lab's other cells do not yet explain."""
    predicted = probs.argmax(1)
    disputed = np.flatnonzero(predicted != labels)
    disputed = disputed[np.argsort(probs[disputed, labels[disputed]], kind="stable")]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "label_confidence", "predicted", "confidence"])
        for i in disputed:
            writer.writerow([files[i], names[labels[i]], f"{probs[i, labels[i]]:.4f}",
                             names[predicted[i]], f"{probs[i, predicted[i]]:.4f}"])
    return {"file": LABELS_TO_REVIEW_FILE, "cells": len(disputed)}


def write_to_label(path: Path, net, pool: torch.Tensor, files: list[str], names: list[str], temperature: float,
                   count: int) -> dict:
    """``path``: the ``count`` unlabelled cells with the smallest margin between the adapted model's two
    best classes, with its two guesses. Measured on Jiangxi Tecom (docs/cross_lab.md): 20 such cells added
    to 10 per class taught about as much as 20 drawn at random (+0.5 ± 1.2 points over 12 draws)."""
    probs = torch.softmax(logits_of(net, pool) / temperature, 1).numpy()
    order = least_certain(probs, count)
    ranked = np.argsort(-probs, axis=1)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "predicted", "confidence", "second", "second_confidence", "margin"])
        for i in order:
            first, second = ranked[i, 0], ranked[i, 1]
            writer.writerow([files[i], names[first], f"{probs[i, first]:.4f}", names[second], f"{probs[i, second]:.4f}",
                             f"{probs[i, first] - probs[i, second]:.4f}"])
    return {"file": TO_LABEL_FILE, "cells": len(order)}


def adapt_shift(source_dir: Path, source_shift: dict | None, out: Path, net, images, labels, pool) -> dict | None:
    """The adapted model's out-of-distribution statistics: the training lab's, plus this lab's cells.

    Writes ``out/shift.safetensors`` and returns its record for the contract. This lab's labelled
    classes (and the unlabelled cells, grouped by the adapted model's answer)
    become familiar centres, and the threshold rises, if need be, to what this lab's own cells
    need: the median of their leave-one-out distances times the training lab's ratio of threshold
    to median (a few dozen cells give a steady median but no steady 99th percentile).
    """
    head = load_shift_head(source_dir)
    if head is None:
        return None
    features, groups = [], []
    for cells, classes, tag in ((images, labels, "labelled"), (pool, None, "unlabelled")):
        if cells is None or len(cells) == 0:
            continue
        features.append(model_features(net, cells))
        if classes is None:
            classes = logits_of(net, cells).argmax(1).numpy()
        groups += [f"{tag}:{c}" for c in classes]
    if not features:
        return None
    features = np.concatenate(features)
    groups = np.array(groups)
    names = sorted(set(groups))
    centres = np.stack([features[groups == g].mean(0) for g in names])
    adapted = head.with_means(torch.from_numpy(centres))
    with torch.no_grad():
        d2 = adapted.squared_distances(torch.from_numpy(features)).numpy()
    # Leave-one-out: a cell's own centre without it is n/(n-1) times farther away (in Mahalanobis terms, squared).
    own = len(head.means) + np.searchsorted(names, groups)
    sizes = np.array([np.sum(groups == g) for g in names])[np.searchsorted(names, groups)]
    rows = np.arange(len(features))
    d2[rows, own] = np.where(sizes > 1, d2[rows, own] * (sizes / np.maximum(sizes - 1, 1)) ** 2, np.inf)
    ratio = (source_shift or {}).get("threshold_over_median")  # the training lab's
    nearest = d2.min(1)
    lab_threshold = float(np.median(nearest) * ratio) if ratio else float(np.quantile(nearest, 0.99))
    threshold = max(float(head.threshold), lab_threshold)
    adapted = ShiftHead(adapted.means, adapted.precision, threshold)
    info = {"method": "mahalanobis", "file": SHIFT_FILE, "features": int(adapted.means.shape[1]),
            "lab_centres": len(names), "lab_cells": len(features),
            "threshold_raised_by": round(threshold / float(head.threshold), 4)}
    save_shift_head(out, adapted, info)
    return info
