"""Training: the custom CNN, and two-phase fine-tuning of pretrained timm backbones.

Follows torchvision's references/classification: small ``train_one_epoch`` and
``evaluate`` functions, a typed config dumped beside every run, one directory
per run with metrics, curves and checkpoints.  Resuming is exact: every epoch
seeds its own random streams from (seed, epoch), and ``last.safetensors``
holds weights, optimiser, scheduler and counters, written atomically.
Runs the same under ``torchrun`` (DistributedDataParallel, gloo on CPU).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, Field, field_validator, model_validator
from torch import nn

from .augment import AugmentConfig, build_transform
from .data import BloodcellError, Source, load_item, open_source, preprocess
from .distill import DistillConfig, DistillationLoss, load_targets, path_key, targets_for
from .framing import FramingConfig
from .models import CNNConfig, create_model, has_folded_batchnorm, recalibrate_folded_batchnorm


class PhaseConfig(BaseModel):
    """One fine-tuning phase: which part of the network learns, at what rate, for how long."""

    name: str
    epochs: int = Field(ge=0)
    lr: float = Field(gt=0)
    trainable: str = Field("all", description="'head', 'all', or 'top:N' (the head and the last N blocks)")

    @model_validator(mode="after")
    def _check_trainable(self):
        if self.trainable not in ("head", "all") and not (
            self.trainable.startswith("top:") and self.trainable[4:].isdigit()
        ):
            raise ValueError(f"trainable must be 'head', 'all' or 'top:N', got {self.trainable!r}")
        return self


class SubclassConfig(BaseModel):
    """Train on the subclasses that file names carry, answer with their classes.

    PBC names each file after its cell type: ``BNE_`` band and ``SNE_`` segmented neutrophils,
    ``MY_``, ``MMY_``, ``PMY_`` myelocytes, metamyelocytes and promyelocytes in the immature
    granulocyte folder. A band neutrophil looks more like a metamyelocyte than like a segmented
    neutrophil; one "neutrophil" target asks the network to put two unlike groups together.
    """

    pattern: str = Field(r"^([A-Za-z]+)_", description="regular expression on the file name; its first group names the subclass")
    min_images: int = Field(50, ge=1, description="a subclass with fewer training images stays in its class's remainder")

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            groups = re.compile(pattern).groups
        except re.error as exc:
            raise ValueError(f"not a regular expression: {pattern!r} ({exc})") from None
        if groups < 1:
            raise ValueError(f"{pattern!r} has no group: put the subclass name in parentheses, e.g. ^([A-Za-z]+)_")
        return pattern


class ProgressiveConfig(BaseModel):
    """Progressive resizing (fastai's, EfficientNetV2's "progressive learning"): train the first
    epochs on smaller crops, which cost fewer pixels, and grow them to ``image_size``.

    The images are stored at ``image_size`` either way; only the training crop's output size
    changes (the random resized crop, or a resize where zoom is off), so validation, the
    checkpoint and the exported model always see ``image_size``.
    """

    start_size: int = Field(96, ge=16, description="crop size of the first epoch")
    epochs: int = Field(20, ge=1, description="epochs (counted over all phases) over which the size grows to image_size")
    step: int = Field(16, ge=1, description="sizes are multiples of this (whole blocks of the network's stride)")


def epoch_image_size(config: "TrainConfig", epoch_index: int) -> int:
    """The training crop size of epoch ``epoch_index`` (1-based): a linear ramp from the progressive
    start size to ``image_size`` over ``progressive.epochs`` epochs, in multiples of ``step``."""
    ramp = config.progressive
    if ramp is None or epoch_index > ramp.epochs:
        return config.image_size
    fraction = (epoch_index - 1) / ramp.epochs
    size = ramp.start_size + fraction * (config.image_size - ramp.start_size)
    return min(config.image_size, max(ramp.step, int(round(size / ramp.step)) * ramp.step))


class TrainConfig(BaseModel):
    data: Path
    model: str = "tf_mobilenetv3_small_100"
    weights: Path | None = None
    pretrained: bool = True
    image_size: int = Field(128, ge=16, le=1024)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    out: Path | None = None
    phases: list[PhaseConfig] = Field(
        default_factory=lambda: [
            PhaseConfig(name="head", epochs=3, lr=3e-3, trainable="head"),
            PhaseConfig(name="finetune", epochs=12, lr=1e-3, trainable="top:4"),
        ]
    )
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["plateau", "cosine"] = "plateau"
    plateau_factor: float = Field(0.3, gt=0, lt=1)
    plateau_patience: int = Field(2, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    monitor: Literal["val_macro_f1", "val_accuracy", "val_loss"] = "val_macro_f1"
    early_stopping_patience: int = Field(5, ge=1)
    keep: Literal["best", "last"] = Field(
        "best", description="which epoch's weights best.safetensors holds: the best on `monitor`, or the last epoch's "
        "(over ten full recipes neither was better on average: docs/experiments.md, fifth session)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: bool | Path = True
    balanced_sampler: bool = False
    grad_clip: float | None = None
    ema_decay: float | None = Field(None, gt=0, lt=1)
    ema_buffers: Literal["averaged", "live"] = Field(
        "averaged", description="the EMA model's BatchNorm statistics: averaged like its weights (torchvision's "
        "references, timm), or copied from the live model (runs 13-15: EMA validation near chance until the weights settle)")
    augment: AugmentConfig = AugmentConfig()
    framing: FramingConfig | None = Field(None, description="crop a window around the stained cell before the resize (bloodcell.framing)")
    subclasses: SubclassConfig | None = Field(None, description="train on subclasses named in the file names (SubclassConfig)")
    progressive: ProgressiveConfig | None = Field(None, description="progressive resizing of the training crops (ProgressiveConfig)")
    distill: DistillConfig | None = Field(None, description="learn from teachers' probabilities as well (bloodcell.distill)")
    cnn: CNNConfig = CNNConfig()
    workers: int = Field(0, ge=0, description="DataLoader worker processes; 0 augments in-process, faster on 2 cores (benchmarks/train_throughput.py)")
    recalibrate_images: int = Field(512, ge=1, description="training images used to recalibrate folded BatchNorm")

    @property
    def epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    @model_validator(mode="after")
    def _check_progressive(self):
        if self.progressive is not None and self.progressive.start_size > self.image_size:
            raise ValueError(f"progressive.start_size {self.progressive.start_size} is larger than image_size {self.image_size}")
        if self.progressive is not None and self.progressive.epochs >= self.epochs:
            raise ValueError(f"progressive.epochs {self.progressive.epochs} leaves no epoch at image_size "
                             f"(the run has {self.epochs}): the last epochs must train at the size the model is used at")
        return self


def scale_epochs(config: TrainConfig, total: int) -> TrainConfig:
    """Spread ``total`` epochs over the phases in proportion to their configured lengths."""
    if total < len(config.phases):
        raise BloodcellError(f"--epochs {total}: need at least one epoch per phase ({len(config.phases)} phases)")
    current = max(config.epochs, 1)
    counts = [max(1, round(p.epochs * total / current)) for p in config.phases]
    counts[-1] = max(1, total - sum(counts[:-1]))
    phases = [p.model_copy(update={"epochs": n}) for p, n in zip(config.phases, counts)]
    progressive = config.progressive
    if progressive is not None:  # the ramp shrinks with the run, and still ends before its last epoch
        ramp = min(round(progressive.epochs * total / current), total - 1)
        progressive = progressive.model_copy(update={"epochs": ramp}) if ramp >= 1 else None
    return config.model_copy(update={"phases": phases, "progressive": progressive})


# ---------------------------------------------------------------- data


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, S, S) uint8, decoded and resized once
    labels: torch.Tensor  # (N,) int64
    paths: list[str]
    soft: torch.Tensor | None = None  # (N, C) teachers' probabilities, when distilling


def split_sources(data: Path) -> tuple[dict[str, Source], list[str]]:
    """Find train/val(/test) in what `bloodcell curate` writes, or split a plain dataset."""
    curated = data / "images"
    if (curated / "train").is_dir() and (curated / "val").is_dir():
        sources = {s: open_source(curated / s) for s in ("train", "val", "test") if (curated / s).is_dir()}
    elif (data / "train.npz").is_file() and (data / "val.npz").is_file():
        sources = {s: open_source(data / f"{s}.npz") for s in ("train", "val", "test") if (data / f"{s}.npz").is_file()}
    elif (data / "train").is_dir() and (data / "val").is_dir():
        sources = {s: open_source(data / s) for s in ("train", "val", "test") if (data / s).is_dir()}
    else:
        raise BloodcellError(
            f"{data}: expected the output of `bloodcell curate` (images/train, images/val) or "
            f"train/ and val/ folders (or train.npz and val.npz); run `bloodcell curate {data} --out DIR` first"
        )
    names = sources["train"].class_names
    for split, source in sources.items():
        if source.class_names != names and not set(source.class_names) <= set(names):
            raise BloodcellError(f"{data}: classes of {split} ({source.class_names}) differ from train ({names})")
    return sources, names


def load_split(source: Source, class_names: list[str], image_size: int, workers: int = 2,
               framing: dict | None = None) -> Split:
    """Decode every image once and keep it as uint8 at the model's input size (framed, if the model frames)."""
    from concurrent.futures import ThreadPoolExecutor

    def load(item):
        try:
            return preprocess(load_item(source, item)[0], image_size, framing)
        except Exception as exc:  # noqa: BLE001 - reported with the file name below
            return exc

    remap = [class_names.index(c) for c in source.class_names]
    images, labels, paths = [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item, result in zip(source.items, pool.map(load, source.items, chunksize=64)):
            if isinstance(result, Exception):
                continue  # curation lists unreadable files; training skips them
            images.append(torch.from_numpy(np.array(result)).permute(2, 0, 1))
            labels.append(remap[item.label])
            paths.append(item.path)
    if not images:
        raise BloodcellError(f"{source.root}: no readable images")
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64), paths)


@dataclass
class Subclasses:
    names: list[str]  # "class:subclass", or the class's own name for its remainder
    parents: list[int]  # each subclass's class index

    def labels(self, paths: list[str], labels: torch.Tensor, class_names: list[str], config: SubclassConfig) -> torch.Tensor:
        """Each image's subclass index; one of a subclass not trained on counts as its class's remainder."""
        index = {name: i for i, name in enumerate(self.names)}
        out = []
        for path, label in zip(paths, labels.tolist()):
            name = _subclass_name(path, class_names[label], config)
            out.append(index.get(name, index.get(class_names[label], -1)))
            if out[-1] < 0:
                raise BloodcellError(f"{path}: subclass {name!r} was not among the training subclasses of {class_names[label]!r}")
        return torch.tensor(out, dtype=torch.int64)


def _subclass_name(path: str, class_name: str, config: SubclassConfig) -> str:
    match = re.search(config.pattern, Path(path.split("::")[0]).name)
    return f"{class_name}:{match.group(1)}" if match else class_name


def find_subclasses(paths: list[str], labels: list[int], class_names: list[str], config: SubclassConfig) -> Subclasses:
    """The subclasses to train on: those with at least ``min_images`` images, in classes that have two or more.

    A class with fewer than two such subclasses stays one target; a class's images outside
    its kept subclasses form its remainder, named after the class.
    """
    from collections import Counter

    counts = Counter((label, _subclass_name(path, class_names[label], config)) for path, label in zip(paths, labels))
    names, parents = [], []
    for label, class_name in enumerate(class_names):
        kept = sorted(name for (c, name), n in counts.items() if c == label and n >= config.min_images and name != class_name)
        if len(kept) < 2:
            kept = []  # one target for the class
        has_remainder = not kept or any(c == label and name not in kept for c, name in counts)
        for name in kept + ([class_name] if has_remainder else []):
            names.append(name)
            parents.append(label)
    return Subclasses(names, parents)


class TensorImages(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform=None):
        self.split = split
        self.transform = transform

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, index):
        image = self.split.images[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.split.soft is not None:
            return image, self.split.labels[index], self.split.soft[index]
        return image, self.split.labels[index]


# ---------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun; CUDA when present, else CPU."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch.distributed as dist

        info = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return info, device
    return Dist(), torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync_buffers(model: nn.Module, dist_info: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics).

    DDP keeps parameters identical through gradient averaging and broadcasts
    buffers before each forward, but the last step's running statistics are
    each rank's own; this makes them agree before evaluation and saving.
    """
    if dist_info.world > 1:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def all_reduce_sum(values: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


# ---------------------------------------------------------------- freezing


def parameter_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters in network order, grouped by block; the last group is the head."""
    net = model.net
    if hasattr(net, "group_matcher"):
        from timm.models import group_parameters

        grouped = group_parameters(net, net.group_matcher(coarse=True))
        groups = [[f"net.{n}" for n in names] for _, names in sorted(grouped.items())]
        head_names = {f"net.{n}" for n, _ in net.get_classifier().named_parameters(prefix=_classifier_prefix(net))}
        body = [[n for n in g if n not in head_names] for g in groups]
        return [g for g in body if g] + [sorted(head_names)]
    blocks = [[f"net.blocks.{i}.{n}" for n, _ in block.named_parameters()] for i, block in enumerate(net.blocks)]
    return blocks + [[f"net.head.{n}" for n, _ in net.head.named_parameters()]]


def _classifier_prefix(net: nn.Module) -> str:
    classifier = net.get_classifier()
    for name, module in net.named_modules():
        if module is classifier:
            return name
    return ""


def apply_phase(model: nn.Module, trainable: str) -> list[str]:
    """Freeze all but what the phase trains; returns the names of trainable parameters."""
    groups = parameter_groups(model)
    if trainable == "all":
        chosen = [n for g in groups for n in g]
    else:
        count = 0 if trainable == "head" else int(trainable.split(":")[1])
        # The head is the last group; 'top:N' adds the N groups before it.
        chosen = [n for g in groups[max(len(groups) - 1 - count, 0) :] for n in g]
    chosen_set = set(chosen)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen_set)
    return chosen


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """BatchNorms whose parameters are frozen also keep their running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()


# ---------------------------------------------------------------- one epoch


def macro_f1(confusion: torch.Tensor) -> float:
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).double().clamp_min(1)
    recall = tp / confusion.sum(1).double().clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    present = confusion.sum(1) > 0
    return float(f1[present].mean()) if present.any() else 0.0


def train_one_epoch(model, loader, criterion, optimizer, device, dist_info: Dist, grad_clip=None, ema=None,
                    on_step: Callable[[int, float], None] | None = None, parents: torch.Tensor | None = None) -> dict:
    """One pass over ``loader``. With ``parents`` (each subclass's class) the targets are subclasses,
    and the accuracy reported is still over classes. Batches may carry more targets after the
    labels (teachers' probabilities); they are handed to ``criterion`` after the labels."""
    model.train()
    freeze_batchnorm_stats(model)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    start = time.perf_counter()
    for images, labels, *more_targets in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits, labels, *(t.to(device, non_blocking=True) for t in more_targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        with torch.no_grad():
            predicted = logits.argmax(1)
            if parents is not None:
                predicted, labels = parents[predicted], parents[labels]
            totals += torch.tensor([loss.item() * len(labels), (predicted == labels).sum().item(), len(labels)],
                                   dtype=torch.float64)
        if on_step:
            on_step(len(labels), loss.item())
    elapsed = time.perf_counter() - start
    totals = all_reduce_sum(totals, dist_info)
    return {"loss": totals[0].item() / max(totals[2].item(), 1), "accuracy": totals[1].item() / max(totals[2].item(), 1),
            "images_per_s": totals[2].item() / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate(model, loader, criterion, device, num_classes: int, dist_info: Dist = Dist()) -> dict:
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    for images, labels in loader:
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        logits = model(images).cpu()
        loss_sum += criterion(logits, labels).item() * len(labels)
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).view(
            num_classes, num_classes
        )
    confusion = all_reduce_sum(confusion, dist_info)
    loss_sum = all_reduce_sum(loss_sum, dist_info)
    count = confusion.sum().item()
    return {"loss": loss_sum.item() / max(count, 1), "accuracy": confusion.diag().sum().item() / max(count, 1),
            "macro_f1": macro_f1(confusion), "confusion": confusion}


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a safetensors file atomically: a kill mid-write leaves the old file intact."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"bloodcell": json.dumps(meta)})
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise BloodcellError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("bloodcell", "{}"))
        return load_file(str(path)), meta
    except Exception as exc:  # noqa: BLE001
        raise BloodcellError(f"{path}: not a readable bloodcell checkpoint ({exc})") from None


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---------------------------------------------------------------- the run


def make_run_dir(config: TrainConfig) -> Path:
    if config.out is not None:
        return Path(config.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.model}-{config.image_size}"


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _class_weights(config: TrainConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    if config.class_weights is False:
        return None
    if isinstance(config.class_weights, Path) or (config.data / "class_weights.json").is_file():
        path = config.class_weights if isinstance(config.class_weights, Path) else config.data / "class_weights.json"
        weights = json.loads(Path(path).read_text())["weights"]
        if len(weights) != num_classes:
            raise BloodcellError(f"{path}: {len(weights)} class weights for {num_classes} classes")
        return torch.tensor(weights, dtype=torch.float32)
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1)), torch.zeros_like(counts))
    return weights.float()


def _plot_curves(rows: list[dict], run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [r["epoch"] for r in rows]
    for metric, name in (("accuracy", "accuracy.png"), ("loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(epochs, [r[f"train_{metric}"] for r in rows], marker="o", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in rows], marker="o", label="validation")
        changes = [r["epoch"] for a, r in zip(rows, rows[1:]) if a["phase"] != r["phase"]]
        for x in changes:
            ax.axvline(x - 0.5, color="grey", linestyle=":")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.savefig(run_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module  # the trained network (last epoch), on this process
    rows: list[dict]


def make_scheduler(config: TrainConfig, phase: PhaseConfig, optimizer: torch.optim.Optimizer):
    """Plateau (stepped with the monitored metric) or per-phase cosine with linear warm-up (stepped each epoch)."""
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min" if config.monitor == "val_loss" else "max",
            factor=config.plateau_factor, patience=config.plateau_patience)
    warm = config.warmup_epochs

    def cosine(e, total=phase.epochs, warm=warm):
        if e < warm:
            return (e + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * (e - warm) / max(total - warm, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def epoch_loader(config: TrainConfig, split: Split, transform, epoch_index: int, dist_info,
                 balance_labels: torch.Tensor | None = None) -> torch.utils.data.DataLoader:
    """The training loader of one epoch; its order depends only on (seed, epoch), so resuming is exact.

    The balanced sampler balances ``balance_labels`` (the classes, when ``split`` holds subclasses)."""
    dataset = TensorImages(split, transform)
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch_index)
    if dist_info.world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, dist_info.world, dist_info.rank,
                                                                  shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch_index)
    elif config.balanced_sampler:
        labels = split.labels if balance_labels is None else balance_labels
        sample_weights = (1.0 / torch.bincount(labels).double())[labels]
        sampler = torch.utils.data.WeightedRandomSampler(sample_weights, len(dataset), generator=generator)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    return torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                                       num_workers=config.workers, drop_last=len(dataset) > config.batch_size,
                                       persistent_workers=False)


def write_run_files(run_dir: Path, config: TrainConfig, class_names: list[str], contract: dict,
                    subclasses: Subclasses | None = None) -> None:
    """config.yaml (the resolved settings) and model.json (the preprocessing contract) of a run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
    (run_dir / "model.json").write_text(json.dumps({
        "model": config.model, "class_names": class_names, "image_size": config.image_size,
        "mean": contract["mean"], "std": contract["std"], "input": "uint8 RGB, N x 3 x H x W",
        "resize": "PIL bicubic of the whole image (or of the framing crop) to image_size x image_size (bloodcell.data.preprocess)",
        "framing": config.framing.model_dump() if config.framing else None,
        "cnn": config.cnn.model_dump() if config.model == "cnn" else None,
        "subclasses": {"names": subclasses.names, "parents": subclasses.parents} if subclasses else None,
    }, indent=2))


def save_resume_point(run_dir: Path, model: nn.Module, ema, optimizer, scheduler, meta: dict) -> None:
    """``last.safetensors``: weights, EMA, optimizer and scheduler state, progress, to resume exactly."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    optim_tensors, optim_meta = _flatten_optimizer(optimizer)
    # A LambdaLR's lambdas are code, rebuilt from the config on resume; only its counters are saved.
    schedule_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    save_checkpoint(run_dir / "last.safetensors", {**tensors, **optim_tensors},
                    {**meta, "optimizer": optim_meta, "scheduler": schedule_state})


def last_epoch_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights a run validated at its last epoch (the EMA's where it kept one), from ``last.safetensors``.

    What ``keep: last`` would have kept; for comparing it with the best checkpoint of a finished run.
    """
    tensors, meta = load_checkpoint(Path(run_dir) / "last.safetensors")
    ema = {k[len("ema.module."):]: v for k, v in tensors.items() if k.startswith("ema.module.")}
    weights = ema or {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    kept = {k: meta[k] for k in ("model", "class_names", "image_size", "mean", "std", "epoch") if k in meta}
    if meta.get("rows"):  # the last epoch's validation figures, as a kept checkpoint records them
        row = meta["rows"][-1]
        kept["val"] = {"loss": row["val_loss"], "accuracy": row["val_accuracy"], "macro_f1": row["val_macro_f1"]}
    return weights, kept


def train(config: TrainConfig | None, resume: Path | None = None, log: Callable[[str], None] = print,
          progress_factory=None, stop_after_epochs: int | None = None) -> TrainResult:
    """Train as configured.  ``resume`` continues a run directory from its ``last`` checkpoint."""
    dist_info, device = init_distributed()
    if not dist_info.main:
        log = lambda line: None  # noqa: E731 - one voice per run: rank 0 speaks
    if resume is not None:
        resume = Path(resume)
        saved = resume / "config.yaml"
        if not saved.is_file():
            raise BloodcellError(f"{resume}: not a run directory (no config.yaml)")
        config = TrainConfig(**yaml.safe_load(saved.read_text()))
        run_dir = resume
    else:
        run_dir = make_run_dir(config)
    if not Path(config.data).exists():
        raise BloodcellError(f"{config.data}: data path not found")
    sources, class_names = split_sources(Path(config.data))
    num_classes = len(class_names)
    # A missing or unreadable targets file fails now, not after loading the images.
    teacher_file = load_targets(config.distill.targets) if config.distill is not None else None
    subclasses = None
    if config.subclasses is not None:
        train_items = sources["train"].items
        subclasses = find_subclasses([i.path for i in train_items], [i.label for i in train_items], class_names,
                                     config.subclasses)
        log(f"subclasses: {len(subclasses.names)} targets for {num_classes} classes "
            f"({', '.join(n for n in subclasses.names if ':' in n) or 'none found: every class stays one target'})")
    # Seed before the model exists: a new head (or the whole custom CNN) is initialised from
    # the global generator, whose state at this point was not the same from one process to
    # the next (runs 11 and 12 of one config differed from epoch 1).
    _seed_everything(config.seed)
    model, contract = create_model(config.model, num_classes, config.weights, config.pretrained, config.cnn,
                                   subclasses.parents if subclasses else None)
    model = model.to(device).to(memory_format=torch.channels_last)

    framing = config.framing.model_dump() if config.framing else None
    train_split = load_split(sources["train"], class_names, config.image_size, framing=framing)
    val_split = load_split(sources["val"], class_names, config.image_size, framing=framing)
    log(f"data: {len(train_split.labels)} train, {len(val_split.labels)} val images at {config.image_size} px, "
        f"{num_classes} classes; device {device}, {dist_info.world} process(es)")

    state_tensors, state_meta = None, None
    if resume is not None and (run_dir / "last.safetensors").is_file():
        state_tensors, state_meta = load_checkpoint(run_dir / "last.safetensors")
    elif config.model != "cnn" and has_folded_batchnorm(model):
        generator = torch.Generator().manual_seed(config.seed)
        pick = torch.randperm(len(train_split.labels), generator=generator)[: config.recalibrate_images]
        count = recalibrate_folded_batchnorm(model, train_split.images[pick].to(device))
        log(f"folded BatchNorm detected: recalibrated {count} layers on {len(pick)} training images")

    if dist_info.main:
        write_run_files(run_dir, config, class_names, contract, subclasses)

    weights = _class_weights(config, train_split.labels, num_classes)
    fit_split = train_split  # what the loss sees: classes, or subclasses
    subclass_parents = torch.tensor(subclasses.parents, device=device) if subclasses else None
    if subclasses:
        fit_split = Split(train_split.images, subclasses.labels(train_split.paths, train_split.labels, class_names,
                                                                config.subclasses), train_split.paths)
        # Each subclass weighs as its class does: the classes' balance stays what it was.
        weights = weights[torch.tensor(subclasses.parents)] if weights is not None else None
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                    label_smoothing=config.label_smoothing)
    if config.distill is not None:
        keys = [path_key(sources["train"].root, path) for path in train_split.paths]
        fit_split = Split(fit_split.images, fit_split.labels, fit_split.paths,
                          targets_for(config.distill.targets, keys, class_names, teacher_file))
        criterion = DistillationLoss(criterion, config.distill.weight, config.distill.temperature, subclass_parents)
        agree = float((fit_split.soft.argmax(1) == train_split.labels).float().mean())
        log(f"distillation: teachers' targets for {len(keys)} training images from {config.distill.targets} "
            f"(they agree with {agree:.2%} of the labels), weight {config.distill.weight}, temperature {config.distill.temperature}")
    eval_criterion = nn.CrossEntropyLoss()
    val_loader = torch.utils.data.DataLoader(
        TensorImages(val_split), batch_size=config.batch_size * 2,
        sampler=torch.utils.data.distributed.DistributedSampler(TensorImages(val_split), dist_info.world, dist_info.rank, shuffle=False)
        if dist_info.world > 1 else None)

    ema = None
    if config.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay),
                                                  use_buffers=config.ema_buffers == "averaged")
    net = model
    if dist_info.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    rows: list[dict] = []
    progress_state = {"epoch": 0, "best": None, "bad_epochs": 0, "stopped": False}
    if state_meta is not None:
        progress_state = state_meta["progress"]
        rows = state_meta["rows"]
        model.load_state_dict({k[6:]: v for k, v in state_tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in state_tensors.items() if k.startswith("ema.")}, strict=False)
        log(f"resuming {run_dir} after epoch {progress_state['epoch']}")

    epoch_index = 0
    epochs_run = 0
    for phase_index, phase in enumerate(config.phases):
        apply_phase(model, phase.trainable)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=phase.lr,
                                      weight_decay=config.weight_decay)
        scheduler = make_scheduler(config, phase, optimizer)
        phase_start = epoch_index
        if state_meta is not None and progress_state["epoch"] > phase_start and state_meta["phase"] == phase_index:
            _restore_optimizer(optimizer, state_tensors, state_meta["optimizer"])
            scheduler.load_state_dict(state_meta["scheduler"])
        for _ in range(phase.epochs):
            epoch_index += 1
            if epoch_index <= progress_state["epoch"]:
                continue  # done before the interruption
            if progress_state["stopped"]:
                break
            # Each epoch's randomness depends only on (seed, epoch): resuming is exact.
            _seed_everything(config.seed * 100_003 + epoch_index)
            size = epoch_image_size(config, epoch_index)  # smaller in the first epochs with progressive resizing
            transform = build_transform(config.augment, config.image_size, output_size=size)  # cheap, draws nothing
            loader = epoch_loader(config, fit_split, transform, epoch_index, dist_info, train_split.labels)
            on_step = None
            bar = None
            if progress_factory is not None and dist_info.main:
                bar = progress_factory(f"epoch {epoch_index}/{config.epochs} ({phase.name})", len(loader.sampler) // max(dist_info.world, 1))
                on_step = bar
            model.emit_subclasses = subclasses is not None  # the loss is on subclasses; validation on classes
            try:
                train_stats = train_one_epoch(net, loader, criterion, optimizer, device, dist_info, config.grad_clip, ema,
                                              on_step, subclass_parents)
            finally:
                model.emit_subclasses = False
            sync_buffers(model, dist_info)
            if ema is not None:
                sync_buffers(ema, dist_info)
            eval_model = ema.module if ema is not None else model
            val_stats = evaluate(eval_model, val_loader, eval_criterion, device, num_classes, dist_info)
            monitored = val_stats[config.monitor[4:]]
            epoch_lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
            if config.schedule == "plateau":
                scheduler.step(monitored)
            else:
                scheduler.step()
            improved = progress_state["best"] is None or (
                monitored < progress_state["best"] if config.monitor == "val_loss" else monitored > progress_state["best"])
            if improved:
                progress_state["best"] = monitored
                progress_state["bad_epochs"] = 0
            else:
                progress_state["bad_epochs"] += 1
            row = {"epoch": epoch_index, "phase": phase.name, "train_loss": train_stats["loss"],
                   "train_accuracy": train_stats["accuracy"], "val_loss": val_stats["loss"],
                   "val_accuracy": val_stats["accuracy"], "val_macro_f1": val_stats["macro_f1"],
                   "lr": epoch_lr, "images_per_s": train_stats["images_per_s"], "train_size": size,
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            rows.append(row)
            progress_state["epoch"] = epoch_index
            if progress_state["bad_epochs"] >= config.early_stopping_patience:
                progress_state["stopped"] = True
            log(f"epoch {epoch_index}/{config.epochs} [{phase.name}] train loss {row['train_loss']:.4f} "
                f"acc {row['train_accuracy']:.4f} | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} "
                f"macro-F1 {row['val_macro_f1']:.4f} | lr {row['lr']:.2e} | {row['images_per_s']:.0f} img/s"
                + (f" at {size} px" if size != config.image_size else "")
                + (" | best" if improved else ""))
            if dist_info.main:
                meta_common = {"model": config.model, "class_names": class_names, "image_size": config.image_size,
                               "mean": contract["mean"], "std": contract["std"], "epoch": epoch_index}
                if improved or config.keep == "last":
                    kept_weights = ema.module.state_dict() if ema is not None else model.state_dict()
                    save_checkpoint(run_dir / "best.safetensors", dict(kept_weights), {**meta_common, "keep": config.keep, "val": {
                        k: v for k, v in val_stats.items() if k != "confusion"}})
                save_resume_point(run_dir, model, ema, optimizer, scheduler, {
                    **meta_common, "phase": phase_index, "progress": progress_state, "rows": rows})
                _write_metrics(rows, run_dir)
            epochs_run += 1
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                return TrainResult(run_dir, model, rows)  # an interruption, as tests simulate it
            if progress_state["stopped"]:
                log(f"early stopping: {config.monitor} did not improve for {config.early_stopping_patience} epochs")
                break
        if progress_state["stopped"]:
            break
    if dist_info.main and (run_dir / "best.safetensors").is_file():
        calibrate_run(run_dir, val_split, log)
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return TrainResult(run_dir, model, rows)


def calibrate_run(run_dir: Path, val_split: Split, log: Callable[[str], None] = print) -> float:
    """Fit a softmax temperature on the validation split for the best checkpoint; store it in model.json."""
    from .evaluate import backend_logits, expected_calibration_error, fit_temperature
    from .predict import load_predictor

    logits = backend_logits(load_predictor(run_dir), val_split.images)
    meta = json.loads((run_dir / "model.json").read_text())
    temperature = fit_temperature(logits, val_split.labels)
    labels = val_split.labels.numpy()
    before = expected_calibration_error(torch.softmax(logits, 1).numpy(), labels)
    after = expected_calibration_error(torch.softmax(logits / temperature, 1).numpy(), labels)
    nll = nn.functional.cross_entropy
    meta.update(temperature=temperature, val_ece_before=before, val_ece_after=after,
                val_nll_before=float(nll(logits, val_split.labels)),
                val_nll_after=float(nll(logits / temperature, val_split.labels)))
    (run_dir / "model.json").write_text(json.dumps(meta, indent=2))
    log(f"temperature {temperature:.3f} fitted on validation: ECE {before:.2%} -> {after:.2%}")
    return temperature


def _write_metrics(rows: list[dict], run_dir: Path) -> None:
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        # A run resumed from an older version may lack later columns in its first rows.
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(handle, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(rows)
    _plot_curves(rows, run_dir)
