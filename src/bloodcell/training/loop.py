"""One epoch of training and one pass of validation, as torchvision's references/classification/train.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ..evaluation.metrics import macro_f1
from .distributed import Dist, all_reduce_sum
from .freezing import freeze_batchnorm_stats


def train_one_epoch(model, loader, criterion, optimizer, device, dist_info: Dist, grad_clip=None, ema=None,
                    on_step: Callable[[int, float], None] | None = None, parents: torch.Tensor | None = None,
                    mix: Callable | None = None) -> dict:
    """One pass over ``loader``. With ``parents`` (each subclass's class) the targets are subclasses,
    and the accuracy reported is still over classes. Batches may carry more targets after the
    labels (teachers' probabilities); they are handed to ``criterion`` after the labels. ``mix``
    ((images, labels) -> (images, soft targets): MixUp or CutMix, :func:`batch_mixer`) mixes each
    batch before the loss; the accuracy is still against each image's own label."""
    model.train()
    freeze_batchnorm_stats(model)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    start = time.perf_counter()
    for images, labels, *more_targets in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        if mix is not None:
            mixed, targets = mix(images.float(), labels)
            logits = model(mixed.contiguous(memory_format=torch.channels_last))
            loss = criterion(logits, targets)
        else:
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


def batch_mixer(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> Callable | None:
    """torchvision's MixUp and CutMix (one of them per batch when both are set), or None when both are 0."""
    from torchvision.transforms import v2

    mixers = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha else []) + (
        [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha else [])
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


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
