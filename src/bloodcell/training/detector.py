"""Training the cell detector on YOLO-format fields, with the run conventions of ``train``.

A run directory holds ``config.yaml`` (these settings), ``detector.json`` (the contract
prediction reads), ``metrics.csv`` (one row per epoch: losses, validation AP50 per kind),
``best.safetensors`` (highest validation mAP50), ``last.safetensors`` (weights, optimizer and
schedule, to resume exactly) and, at the end, ``detector.onnx``.

Each epoch's samples depend only on (seed, epoch): a resumed run draws what the uninterrupted
run would have drawn.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, Field, field_validator

from ..core.errors import BloodcellError
from ..core.settings import data_root, default_weights, resolve_weights
from ..data.fields import (
    KINDS,
    Boxes,
    FieldItem,
    field_splits,
    letterbox,
    load_field,
    open_fields,
    platelet_patches,
    read_kinds,
    read_label_fixes,
    training_sample,
)
from ..evaluation.detection import detection_metrics
from ..inference.detect import CellDetector, export_detector
from ..models import load_checkpoint, save_checkpoint
from ..models.detector import (
    DETECTOR_FILE,
    DetectorContract,
    DetectorGraph,
    build_detector,
)
from .saver import flatten_optimizer, restore_optimizer


class DetectorTrainConfig(BaseModel):
    """Settings of ``bloodcell train-detector``; the defaults are the shipped detector's recipe."""

    data: Path | None = Field(None, description="a YOLO-format field set (images/, labels/, classes.txt)")
    out: Path | None = None
    detector: DetectorContract = Field(default_factory=DetectorContract)
    weights: str | None = Field(None, description="ImageNet backbone weights; default: the backbone's file in $BLOODCELL_WEIGHTS")
    label_fixes: Path | None = Field(None, description="fixes of the set's label files (a JSON list, as "
                                     "benchmarks/fields_label_fixes.json): boxes of the wrong kind and boxes left out, "
                                     "read by eye; the files are not changed")
    extra_data: list[Path] = Field(default_factory=list, description="more boxed field sets (any layout bloodcell reads), "
                                   "e.g. other labs' fields: their train split (all of a set without splits) joins training")
    extra_share: float = Field(0.3, ge=0, le=1, description="share of training samples drawn from extra_data")
    platelets: Path | None = Field(None, description="PBC platelet crops pasted into training fields; default $BLOODCELL_DATA/pbc224/platelet")
    max_pasted: int = Field(4, ge=0, description="platelets pasted per field, drawn from 0..max_pasted")
    paste_own_size_p: float = Field(0.0, ge=0, le=1, description="share of pasted platelets given their own size against "
                                    "their PBC image's red cells (giant platelets as large as a red cell) rather than "
                                    "0.2-0.45 of the field's red cells")
    epochs: int = Field(60, ge=1)
    samples_per_epoch: int = Field(352, ge=1)
    batch_size: int = Field(8, ge=1)
    crop: int = Field(384, ge=64, description="training crops are this square side, at the letterbox scale times the zoom")
    zoom: tuple[float, float] = Field((0.3, 1.5), description="log-uniform zoom range around the letterbox scale")
    fields_per_sample: int = Field(4, ge=1, description="fields tiled side by side when zoomed out")
    blank_p: float = Field(0.05, ge=0, le=1, description="share of samples that are empty fields (no cells, no boxes)")
    min_visible: float = Field(0.35, ge=0, le=1, description="a cell cut by a training crop's edge keeps its box when this "
                               "share of it is inside (the data's own labels include slivers at the field's edge)")
    min_visible_by_kind: dict[str, float] = Field(default_factory=dict, description="min_visible for some kinds "
                                                  "(white_cell, red_cell, platelet), the others keeping min_visible")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(300, ge=0)
    keep: Literal["last", "best"] = Field("last", description="best.safetensors holds the last epoch's weights, or the best "
                                        "validation mAP50's (noisy with few platelets: 3 in the Raabin val split)")
    seed: int = 0

    @field_validator("min_visible_by_kind")
    @classmethod
    def _known_kinds(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown kind {', '.join(unknown)}; the kinds are {', '.join(KINDS)}")
        if any(not 0 <= share <= 1 for share in value.values()):
            raise ValueError("each share must lie between 0 and 1")
        return value


def _sample_rng(config: DetectorTrainConfig, epoch: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, epoch])


def load_items(root: Path, items: list[FieldItem]) -> list[tuple[np.ndarray, Boxes]]:
    """Each field of ``items`` (opened from the set at ``root``) decoded, with its boxes."""
    kinds = read_kinds(root)
    return [load_field(item, kinds) for item in items]


def load_extra(roots: list[Path]) -> list[tuple[np.ndarray, Boxes]]:
    """The training fields of more field sets: each one's train split, or all of a set without splits."""
    fields = []
    for root in map(Path, roots):
        fields += load_items(root, open_fields(root, "train" if "train" in field_splits(root) else None))
    return fields


def red_cell_side(fields: list[tuple[np.ndarray, Boxes]], size: int) -> float | None:
    """The median red-cell box side over ``fields``, in the pixels of their letterbox to ``size``: the
    detector's ruler for fields taken at another magnification (None: no red cells labelled)."""
    red = KINDS.index("red_cell")
    sides = [np.maximum(b.xyxy[b.kinds == red, 2] - b.xyxy[b.kinds == red, 0],
                        b.xyxy[b.kinds == red, 3] - b.xyxy[b.kinds == red, 1]) * size / max(image.shape[:2])
             for image, b in fields]
    sides = np.concatenate(sides) if sides else np.zeros(0)
    return round(float(np.median(sides)), 1) if len(sides) else None


def draw_fields(rng: np.random.Generator, fields: list, extra: list, extra_share: float, count: int) -> list:
    """The fields of one training sample, all from one lab: from ``extra`` with probability ``extra_share``
    (where there are any; the draws are as without them otherwise, so older runs resume alike)."""
    pool = extra if extra and rng.random() < extra_share else fields
    return [pool[i] for i in rng.integers(len(pool), size=count)]


def validate(graph: DetectorGraph, canvases: list[np.ndarray], truth: list[Boxes], contract: DetectorContract) -> dict:
    """AP50 per kind on letterboxed validation fields (boxes in canvas pixels).

    The fields are read at the letterbox scale only: they are the training lab's, at its
    magnification, and a half-trained network's red cells are no ruler (read on magnified tiles at
    a score of 0.05, the first epochs' boxes ran to tens of thousands per field).
    """
    graph.eval()
    low = contract.lowered().model_copy(update={"red_cell_side": None})

    def run(batch):
        with torch.inference_mode():
            boxes, scores = graph(torch.from_numpy(batch))
        return boxes.numpy(), scores.numpy()

    detector = CellDetector(run, low)
    found = []
    for start in range(0, len(canvases), 8):
        found += detector.detect_batch(canvases[start : start + 8])
    return detection_metrics(found, truth, operating=contract.operating())


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_detector(config: DetectorTrainConfig | None = None, resume: Path | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """Train (or resume) a detector run; returns its directory."""
    if resume is not None:
        resume = Path(resume)
        if not (resume / "config.yaml").is_file():
            raise BloodcellError(f"{resume}: not a detector run directory (no config.yaml)")
        config = DetectorTrainConfig(**yaml.safe_load((resume / "config.yaml").read_text()))
        run_dir = resume
    else:
        if config is None or config.data is None:
            raise BloodcellError("no fields: pass --data DIR (YOLO layout: images/, labels/, classes.txt)")
        run_dir = Path(config.out) if config.out else Path("runs") / time.strftime("det-%Y%m%d-%H%M%S")
    root = Path(config.data)
    fixes = read_label_fixes(config.label_fixes, root) if config.label_fixes else None
    train_items, val_items = open_fields(root, "train", fixes), open_fields(root, "val", fixes)
    train_fields, val_fields = load_items(root, train_items), load_items(root, val_items)
    if fixes:
        applied = sum(len(item.fixes) for item in train_items + val_items)
        log(f"label fixes: {applied} fix{'es' if applied != 1 else ''} of the train and val labels from "
            f"{config.label_fixes}")
    log(f"fields: {len(train_fields)} train, {len(val_fields)} val "
        f"({', '.join(f'{sum(int((b.kinds == k).sum()) for _, b in train_fields)} {n}' for k, n in enumerate(KINDS))} in train)")
    extra_fields = load_extra(config.extra_data) if config.extra_data else []
    if extra_fields:
        log(f"more fields: {len(extra_fields)} from {', '.join(map(str, config.extra_data))}, "
            f"{config.extra_share:.0%} of the training samples")

    min_visible = np.array([config.min_visible_by_kind.get(kind, config.min_visible) for kind in KINDS], np.float32)
    platelet_dir = config.platelets or (data_root() / "pbc224" / "platelet" if data_root() else None)
    patches = []
    if config.max_pasted and platelet_dir is not None and Path(platelet_dir).is_dir():
        patches = platelet_patches(sorted(p for p in Path(platelet_dir).iterdir() if p.is_file()), seed=config.seed)
        log(f"platelets to paste: {len(patches)} cut from {platelet_dir}")
    elif config.max_pasted:
        log("no platelet crops found (set platelets: DIR): platelets come from the fields alone")

    contract = config.detector.model_copy(update={"red_cell_side": red_cell_side(train_fields, config.detector.image_size),
                                                  "trained_on": {
        "data": str(root), "fields": len(train_fields),
        **({"label_fixes": str(config.label_fixes)} if fixes else {}), "pasted_platelets_from": str(platelet_dir) if patches else None,
        **({"extra_data": [str(p) for p in config.extra_data], "extra_fields": len(extra_fields),
            "extra_share": config.extra_share} if extra_fields else {})}})
    torch.manual_seed(config.seed)
    weights = resolve_weights(config.weights) if config.weights else default_weights(contract.backbone)
    model = build_detector(contract, weights if resume is None else None)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = max(1, config.samples_per_epoch // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total_steps, config.warmup_steps))

    start_epoch, best, rows = 0, -1.0, []
    if resume is not None:
        tensors, meta = load_checkpoint(run_dir / "last.safetensors")
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        restore_optimizer(optimizer, tensors, meta["optimizer"])
        scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
        start_epoch, best, rows = meta["epoch"] + 1, meta["best"], meta["rows"]
        log(f"resuming {run_dir} at epoch {start_epoch + 1}")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
    (run_dir / DETECTOR_FILE).write_text(contract.to_json())

    size = contract.image_size
    framed = [letterbox(image, size) for image, _ in val_fields]
    val_canvases = [c for c, _ in framed]
    val_truth = [Boxes(b.xyxy * f.scale + np.array([f.left, f.top] * 2, np.float32), b.kinds)
                 for (_, b), (_, f) in zip(val_fields, framed)]

    for epoch in range(start_epoch, config.epochs):
        started = time.time()
        rng = _sample_rng(config, epoch)
        torch.manual_seed(config.seed * 100_003 + epoch)
        model.train()
        sums: dict[str, float] = {}
        for _ in range(steps_per_epoch):
            images, targets = [], []
            for _ in range(config.batch_size):
                chosen = draw_fields(rng, train_fields, extra_fields, config.extra_share, config.fields_per_sample)
                image, boxes = training_sample(chosen, size, config.crop, rng, patches, config.zoom,
                                               (0, config.max_pasted), config.blank_p, min_visible,
                                               config.paste_own_size_p)
                images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0)
                targets.append({"boxes": torch.from_numpy(boxes.xyxy).reshape(-1, 4), "labels": torch.from_numpy(boxes.kinds)})
            losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise BloodcellError(f"epoch {epoch + 1}: the loss is not finite; lower lr (now {config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            scheduler.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.item() / steps_per_epoch
        graph = DetectorGraph(model, contract)
        val = validate(graph, val_canvases, val_truth, contract)
        row = {"epoch": epoch + 1, **{f"loss_{k}": round(v, 5) for k, v in sums.items()},
               **{f"val_ap50_{n}": (round(val[n]["ap50"], 4) if val[n]["ap50"] is not None else "") for n in KINDS},
               "val_map50": round(val["map50"], 4), "lr": optimizer.param_groups[0]["lr"],
               "seconds": round(time.time() - started, 1)}
        rows.append(row)
        improved = val["map50"] > best
        best = max(best, val["map50"])
        if improved or config.keep == "last":
            save_checkpoint(run_dir / "best.safetensors", model.state_dict(), {"epoch": epoch + 1, "val": val})
        optim_tensors, optim_meta = flatten_optimizer(optimizer)
        schedule_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        save_checkpoint(run_dir / "last.safetensors", {**{f"model.{k}": v for k, v in model.state_dict().items()}, **optim_tensors},
                        {"epoch": epoch, "best": best, "rows": rows, "optimizer": optim_meta, "scheduler": schedule_state})
        with open(run_dir / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        log(f"epoch {epoch + 1}/{config.epochs}  loss {sum(sums.values()):.3f}  val AP50 "
            + "  ".join(f"{n} {row[f'val_ap50_{n}']}" for n in KINDS)
            + f"  ({row['seconds']:.0f} s){'  *' if improved else ''}")
    export_detector(run_dir)
    log(f"detector: {run_dir} (kept the {config.keep} epoch's weights; best val mAP50 {best:.4f}; detector.onnx written)")
    return run_dir
