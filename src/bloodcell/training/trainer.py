"""Training: the custom CNN, and phased fine-tuning of pretrained timm backbones.

Follows torchvision's references/classification: ``train`` is a few small steps around
``train_one_epoch`` and ``evaluate`` (:mod:`.loop`); a typed config and the model contract are
dumped beside every run; each run has its own directory with metrics, curves and checkpoints.
Resuming is exact: every epoch seeds its own random streams from (seed, epoch), and
``last.safetensors`` holds weights, optimiser, scheduler and counters, written atomically.
Runs the same under ``torchrun`` (DistributedDataParallel, gloo on CPU).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from ..core.contract import ModelContract, Subclasses as ContractSubclasses
from ..core.errors import BloodcellError
from ..core.settings import default_weights, resolve_weights
from ..data import training_sources
from ..data.augment import build_transform, load_donors
from ..data.splits import Split, TensorImages, load_split
from ..evaluation.calibration import calibrate_run
from ..evaluation.shift import fit_run_ood_temperature, fit_run_shift
from ..inference.teachers import path_key
from ..models import create_model, has_folded_batchnorm, load_checkpoint, recalibrate_folded_batchnorm, save_checkpoint
from ..models.feature_style import add_feature_style
from ..models.random_conv import add_random_conv
from .config import TrainConfig
from .distill import DistillationLoss, load_targets, targets_for
from .distributed import Dist, init_distributed, sync_buffers
from .freezing import apply_phase
from .curves import write_metrics
from .loop import batch_mixer, evaluate, train_one_epoch
from .saver import make_run_dir, restore_optimizer, save_resume_point, write_run_files
from .config import epoch_image_size
from .schedule import epoch_loader, make_scheduler, seed_everything
from .subclasses import Subclasses, find_subclasses


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module  # the trained network (last epoch), on this process
    rows: list[dict]


@dataclass
class Progress:
    """Where a run stands; saved in ``last.safetensors`` so that a resumed run goes on exactly."""

    epoch: int = 0
    best: float | None = None
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, monitored: float, lower_is_better: bool, patience: int) -> bool:
        """Record an epoch's monitored value; True when it is the best so far. Stops after ``patience`` bad epochs."""
        improved = self.best is None or (monitored < self.best if lower_is_better else monitored > self.best)
        if improved:
            self.best, self.bad_epochs = monitored, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs >= patience:
            self.stopped = True
        return improved


@dataclass
class Run:
    """Everything a training run holds between its steps."""

    config: TrainConfig
    run_dir: Path
    class_names: list[str]
    model: nn.Module
    contract: ModelContract
    train_split: Split
    val_split: Split
    fit_split: Split  # what the loss sees: classes or subclasses, with teachers' targets when distilling
    criterion: nn.Module
    subclass_parents: torch.Tensor | None
    device: torch.device
    dist: Dist
    resume_tensors: dict | None = None
    resume_meta: dict | None = None
    ema: nn.Module | None = None
    rows: list[dict] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    donors: torch.Tensor | None = None  # other labs' unlabelled cells, for augment.foreign_style


def _silent(_line: str) -> None:
    """One voice per run: ranks other than 0 say nothing."""


def resolve_config(config: TrainConfig | None, resume: Path | None) -> tuple[TrainConfig, Path]:
    """The config and run directory: the given ones, or those of the run being resumed."""
    if resume is not None:
        resume = Path(resume)
        saved = resume / "config.yaml"
        if not saved.is_file():
            raise BloodcellError(f"{resume}: not a run directory (no config.yaml)")
        return TrainConfig(**yaml.safe_load(saved.read_text())), resume
    if config is None:
        raise BloodcellError("train needs a TrainConfig or a run directory to resume")
    if config.data is None:
        raise BloodcellError("no data: pass --data DIR (the output of `bloodcell curate`) or set data in --config")
    return config, make_run_dir(config)


def backbone_weights(config: TrainConfig) -> Path | None:
    """The ImageNet weights file: the config's (a bare name is looked up in BLOODCELL_WEIGHTS), else
    the model's file in BLOODCELL_WEIGHTS when there is one; None lets timm download them."""
    if config.model == "cnn" or not config.pretrained:
        return None
    if config.weights is not None:
        return resolve_weights(config.weights)
    return default_weights(config.model)


def build_model(config: TrainConfig, class_names: list[str], subclasses: Subclasses | None) -> tuple[nn.Module, ModelContract]:
    """The network (seeded first: a new head or the whole CNN is drawn from the global generator) and its contract."""
    # Seed before the model exists: the global generator's state at this point was not the same
    # from one process to the next (runs 11 and 12 of one config differed from epoch 1).
    seed_everything(config.seed)
    model, norm = create_model(config.model, len(class_names), backbone_weights(config), config.pretrained, config.cnn,
                               subclasses.parents if subclasses else None, config.input_norm, config.per_image_norm)
    contract = ModelContract(
        model=config.model, class_names=class_names, image_size=config.image_size, mean=norm["mean"], std=norm["std"],
        framing=config.framing.model_dump() if config.framing else None, input_norm=config.input_norm,
        per_image_norm=config.per_image_norm,
        cnn=config.cnn.model_dump() if config.model == "cnn" else None,
        subclasses=ContractSubclasses(names=subclasses.names, parents=subclasses.parents) if subclasses else None)
    if config.feature_style is not None:
        add_feature_style(model.net, config.feature_style)
    if config.random_conv is not None:
        add_random_conv(model.net, config.random_conv)
    return model, contract


def class_weights(config: TrainConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Loss weights per class: none, a file's (curation writes class_weights.json), or balanced from the counts."""
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


def build_objective(config: TrainConfig, train_split: Split, class_names: list[str], subclasses: Subclasses | None,
                    teachers, train_root: Path, device: torch.device,
                    log: Callable[[str], None]) -> tuple[Split, nn.Module, torch.Tensor | None]:
    """What the loss sees (classes or subclasses, teachers' targets) and the loss itself."""
    weights = class_weights(config, train_split.labels, len(class_names))
    fit_split = train_split
    parents = torch.tensor(subclasses.parents, device=device) if subclasses else None
    if subclasses:
        fit_split = Split(train_split.images, subclasses.labels(train_split.paths, train_split.labels, class_names,
                                                                config.subclasses), train_split.paths)
        # Each subclass weighs as its class does: the classes' balance stays what it was.
        weights = weights[torch.tensor(subclasses.parents)] if weights is not None else None
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                    label_smoothing=config.label_smoothing)
    if config.distill is not None:
        keys = [path_key(train_root, path) for path in train_split.paths]
        fit_split = Split(fit_split.images, fit_split.labels, fit_split.paths,
                          targets_for(config.distill.targets, keys, class_names, teachers))
        criterion = DistillationLoss(criterion, config.distill.weight, config.distill.temperature, parents)
        agree = float((fit_split.soft.argmax(1) == train_split.labels).float().mean())
        log(f"distillation: teachers' targets for {len(keys)} training images from {config.distill.targets} "
            f"(they agree with {agree:.2%} of the labels), weight {config.distill.weight}, temperature {config.distill.temperature}")
    return fit_split, criterion, parents


def prepare(config: TrainConfig, run_dir: Path, resuming: bool, device: torch.device, dist: Dist,
            log: Callable[[str], None]) -> Run:
    """Data, model, contract, loss and saved state: everything before the first epoch."""
    if not Path(config.data).exists():
        raise BloodcellError(f"{config.data}: data path not found")
    sources, class_names = training_sources(Path(config.data))
    # A missing or unreadable targets file fails now, not after loading the images.
    teachers = load_targets(config.distill.targets) if config.distill is not None else None
    subclasses = None
    if config.subclasses is not None:
        items = sources["train"].items
        subclasses = find_subclasses([i.path for i in items], [i.label for i in items], class_names, config.subclasses)
        log(f"subclasses: {len(subclasses.names)} targets for {len(class_names)} classes "
            f"({', '.join(n for n in subclasses.names if ':' in n) or 'none found: every class stays one target'})")
    model, contract = build_model(config, class_names, subclasses)
    model = model.to(device).to(memory_format=torch.channels_last)
    framing = contract.framing
    train_split = load_split(sources["train"], class_names, config.image_size, framing=framing)
    val_split = load_split(sources["val"], class_names, config.image_size, framing=framing)
    log(f"data: {len(train_split.labels)} train, {len(val_split.labels)} val images at {config.image_size} px, "
        f"{len(class_names)} classes; device {device}, {dist.world} process(es)")
    for path, why in train_split.unreadable + val_split.unreadable:
        log(f"skipped {path}: {why}")
    donors = None
    if config.augment.enabled and config.augment.foreign_style is not None:
        donors = load_donors(config.augment.foreign_style, config.image_size, framing)
        log(f"foreign styles: {len(donors)} unlabelled cells from {config.augment.foreign_style}")
    resume_tensors = resume_meta = None
    if resuming and (run_dir / "last.safetensors").is_file():
        resume_tensors, resume_meta = load_checkpoint(run_dir / "last.safetensors")
    elif config.model != "cnn" and has_folded_batchnorm(model):
        generator = torch.Generator().manual_seed(config.seed)
        pick = torch.randperm(len(train_split.labels), generator=generator)[: config.recalibrate_images]
        count = recalibrate_folded_batchnorm(model, train_split.images[pick].to(device))
        log(f"folded BatchNorm detected: recalibrated {count} layers on {len(pick)} training images")
    if dist.main:
        write_run_files(run_dir, config, contract)
    fit_split, criterion, parents = build_objective(config, train_split, class_names, subclasses, teachers,
                                                    sources["train"].root, device, log)
    return Run(config, run_dir, class_names, model, contract, train_split, val_split, fit_split, criterion, parents,
               device, dist, resume_tensors, resume_meta, donors=donors)


def restore_progress(run: Run, log: Callable[[str], None]) -> None:
    """Weights, EMA, rows and counters of an interrupted run."""
    if run.resume_meta is None:
        return
    run.progress = Progress(**run.resume_meta["progress"])
    run.rows = run.resume_meta["rows"]
    run.model.load_state_dict({k[6:]: v for k, v in run.resume_tensors.items() if k.startswith("model.")})
    if run.ema is not None:
        run.ema.load_state_dict({k[4:]: v for k, v in run.resume_tensors.items() if k.startswith("ema.")}, strict=False)
    log(f"resuming {run.run_dir} after epoch {run.progress.epoch}")


def make_ema(config: TrainConfig, model: nn.Module) -> nn.Module | None:
    if not config.ema_decay:
        return None
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay),
                                               use_buffers=config.ema_buffers == "averaged")


def validation_loader(run: Run) -> torch.utils.data.DataLoader:
    dataset = TensorImages(run.val_split)
    sampler = (torch.utils.data.distributed.DistributedSampler(dataset, run.dist.world, run.dist.rank, shuffle=False)
               if run.dist.world > 1 else None)
    return torch.utils.data.DataLoader(dataset, batch_size=run.config.batch_size * 2, sampler=sampler)


def run_epoch(run: Run, net: nn.Module, phase, phase_index: int, epoch_index: int, optimizer, scheduler, val_loader,
              progress_factory, log: Callable[[str], None]) -> None:
    """Train one epoch, validate, step the schedule, keep the best weights and the resume point."""
    config, model, ema = run.config, run.model, run.ema
    # Each epoch's randomness depends only on (seed, epoch): resuming is exact.
    seed_everything(config.seed * 100_003 + epoch_index)
    size = epoch_image_size(config, epoch_index)  # smaller in the first epochs with progressive resizing
    transform = build_transform(config.augment, config.image_size, output_size=size, donors=run.donors)  # draws nothing
    loader = epoch_loader(config, run.fit_split, transform, epoch_index, run.dist, run.train_split.labels)
    on_step = None
    if progress_factory is not None and run.dist.main:
        on_step = progress_factory(f"epoch {epoch_index}/{config.epochs} ({phase.name})",
                                   len(loader.sampler) // max(run.dist.world, 1))
    model.emit_subclasses = run.subclass_parents is not None  # the loss is on subclasses; validation on classes
    try:
        mix = batch_mixer(config.mixup_alpha, config.cutmix_alpha,
                          len(run.class_names) if run.subclass_parents is None else len(run.subclass_parents))
        train_stats = train_one_epoch(net, loader, run.criterion, optimizer, run.device, run.dist, config.grad_clip, ema,
                                      on_step, run.subclass_parents, mix)
    finally:
        model.emit_subclasses = False
    sync_buffers(model, run.dist)
    if ema is not None:
        sync_buffers(ema, run.dist)
    eval_model = ema.module if ema is not None else model
    val_stats = evaluate(eval_model, val_loader, nn.CrossEntropyLoss(), run.device, len(run.class_names), run.dist)
    monitored = val_stats[config.monitor[4:]]
    epoch_lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
    if config.schedule == "plateau":
        scheduler.step(monitored)
    else:
        scheduler.step()
    improved = run.progress.update(monitored, config.monitor == "val_loss", config.early_stopping_patience)
    row = {"epoch": epoch_index, "phase": phase.name, "train_loss": train_stats["loss"],
           "train_accuracy": train_stats["accuracy"], "val_loss": val_stats["loss"],
           "val_accuracy": val_stats["accuracy"], "val_macro_f1": val_stats["macro_f1"],
           "lr": epoch_lr, "images_per_s": train_stats["images_per_s"], "train_size": size,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    run.rows.append(row)
    run.progress.epoch = epoch_index
    log(f"epoch {epoch_index}/{config.epochs} [{phase.name}] train loss {row['train_loss']:.4f} "
        f"acc {row['train_accuracy']:.4f} | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} "
        f"macro-F1 {row['val_macro_f1']:.4f} | lr {row['lr']:.2e} | {row['images_per_s']:.0f} img/s"
        + (f" at {size} px" if size != config.image_size else "")
        + (" | best" if improved else ""))
    if run.dist.main:
        save_epoch(run, improved, val_stats, phase_index, optimizer, scheduler)


def save_epoch(run: Run, improved: bool, val_stats: dict, phase_index: int, optimizer, scheduler) -> None:
    """best.safetensors when the epoch is kept, last.safetensors (the resume point) and metrics.csv always."""
    config, contract = run.config, run.contract
    meta_common = {"model": config.model, "class_names": run.class_names, "image_size": config.image_size,
                   "mean": list(contract.mean), "std": list(contract.std), "epoch": run.progress.epoch}
    if improved or config.keep == "last":
        kept_weights = run.ema.module.state_dict() if run.ema is not None else run.model.state_dict()
        save_checkpoint(run.run_dir / "best.safetensors", dict(kept_weights), {
            **meta_common, "keep": config.keep, "val": {k: v for k, v in val_stats.items() if k != "confusion"}})
    save_resume_point(run.run_dir, run.model, run.ema, optimizer, scheduler, {
        **meta_common, "phase": phase_index, "progress": vars(run.progress), "rows": run.rows})
    write_metrics(run.rows, run.run_dir)


def train(config: TrainConfig | None = None, resume: Path | None = None, log: Callable[[str], None] = print,
          progress_factory=None, stop_after_epochs: int | None = None) -> TrainResult:
    """Train as configured, then fit the softmax temperature on validation.

    ``resume`` continues a run directory from its ``last`` checkpoint; ``stop_after_epochs``
    interrupts the run after that many epochs, as tests simulate a kill.
    """
    dist, device = init_distributed()
    log = log if dist.main else _silent
    config, run_dir = resolve_config(config, resume)
    run = prepare(config, run_dir, resume is not None, device, dist, log)
    run.ema = make_ema(config, run.model)
    net = run.model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    restore_progress(run, log)
    val_loader = validation_loader(run)
    epoch_index = epochs_run = 0
    for phase_index, phase in enumerate(config.phases):
        apply_phase(run.model, phase.trainable)
        optimizer = torch.optim.AdamW([p for p in run.model.parameters() if p.requires_grad], lr=phase.lr,
                                      weight_decay=config.weight_decay)
        scheduler = make_scheduler(config, phase, optimizer)
        meta = run.resume_meta
        if meta is not None and run.progress.epoch > epoch_index and meta["phase"] == phase_index:
            restore_optimizer(optimizer, run.resume_tensors, meta["optimizer"])
            # saved without its (unpicklable) lr_lambdas, which torch's LambdaLR requires on loading: keep the live ones
            scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
        for _ in range(phase.epochs):
            epoch_index += 1
            if epoch_index <= run.progress.epoch:
                continue  # done before the interruption
            if run.progress.stopped:
                break
            run_epoch(run, net, phase, phase_index, epoch_index, optimizer, scheduler, val_loader, progress_factory, log)
            epochs_run += 1
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                return TrainResult(run_dir, run.model, run.rows)  # an interruption, as tests simulate it
            if run.progress.stopped:
                log(f"early stopping: {config.monitor} did not improve for {config.early_stopping_patience} epochs")
                break
        if run.progress.stopped:
            break
    if dist.main and (run_dir / "best.safetensors").is_file():
        calibrate_run(run_dir, run.val_split.images, run.val_split.labels, log)
        fit_run_shift(run_dir, run.train_split.images, run.train_split.labels, run.val_split.images, log)
        fit_run_ood_temperature(run_dir, run.val_split.images, run.val_split.labels, log)
    if dist.world > 1:
        import torch.distributed as torch_dist

        torch_dist.barrier()
    return TrainResult(run_dir, run.model, run.rows)
