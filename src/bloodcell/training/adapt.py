"""Adapting a trained model to one lab's cells: a few labelled ones, or any number of unlabelled ones.

Both fine-tune every layer for a fixed number of small steps, starting from the trained model
and pulled back towards it (L2-SP: a penalty on the distance to the starting weights, Li et
al. 2018), with every BatchNorm's statistics frozen. Measured on Jiangxi Tecom with the
shipped model (docs/experiments.md): letting BatchNorm re-estimate its statistics on the
lab's few cells kept the lab's accuracy but dropped PBC from 99% to 62%; frozen, PBC kept 88%.

- Labelled cells are drawn class-balanced (a lab has many neutrophils and one basophil),
  with light augmentation and label smoothing.
- Unlabelled cells teach through pseudo-labels (FixMatch, Sohn et al. 2020): the model's own
  answer on the plain image, kept when confident, is the target for an augmented view.

The network keeps all its classes: classes the lab did not label keep what training taught.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from ..data.augment import AugmentConfig, build_transform


def light_augment() -> AugmentConfig:
    """Flips, right angles, mild zoom and colour: the lab's own cells vary little in stain."""
    return AugmentConfig(zoom_scale=(0.5, 1.0), brightness=0.2, contrast=0.2, saturation=0.2, stain_shift=0.05,
                         blur_p=0.1, pixelate_p=0.0, jpeg_p=0.0)


def strong_augment() -> AugmentConfig:
    """The pseudo-labelled view: stronger colour, blur and occluders (FixMatch's strong view)."""
    return AugmentConfig(zoom_scale=(0.4, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, stain_shift=0.1,
                         blur_p=0.3, pixelate_p=0.1, jpeg_p=0.1, occlude_p=0.3)


class AdaptConfig(BaseModel):
    steps: int = Field(150, ge=1, description="optimizer steps (batches)")
    batch_size: int = Field(32, ge=2)
    lr: float = Field(3e-4, gt=0)
    to_source: float = Field(1e-2, ge=0, description="L2-SP: weight of the squared distance to the trained weights")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    pseudo_threshold: float = Field(0.9, gt=0, le=1, description="confidence a pseudo-label needs to be used")
    seed: int = 0
    augment: AugmentConfig = Field(default_factory=light_augment)
    strong: AugmentConfig = Field(default_factory=strong_augment)


def frozen_statistics(model: nn.Module) -> None:
    """Training mode for dropout and gradients, but every BatchNorm keeps its running statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def balanced_draw(labels: np.ndarray, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices drawn with replacement, each class equally likely."""
    weights = 1.0 / np.bincount(labels)[labels]
    return torch.multinomial(torch.from_numpy(weights), count, replacement=True, generator=generator)


def finetune(model: nn.Module, images: torch.Tensor | None, labels: np.ndarray | None,
             unlabelled: torch.Tensor | None = None, config: AdaptConfig | None = None,
             progress: Callable[[int], None] | None = None) -> dict:
    """Fine-tune ``model`` in place on prepared uint8 (N, 3, S, S) images; returns what it did.

    ``images``/``labels``: the lab's labelled cells (labels in the model's class indices).
    ``unlabelled``: the lab's unlabelled cells. Either may be None, not both.
    """
    config = config or AdaptConfig()
    if (images is None or len(images) == 0) and (unlabelled is None or len(unlabelled) == 0):
        raise ValueError("nothing to adapt on")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    size = images.shape[-1] if images is not None else unlabelled.shape[-1]
    weak = build_transform(config.augment, size) or (lambda image: image)  # None: augmentation switched off
    strong = build_transform(config.strong, size) or (lambda image: image)
    source = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    has_labels = images is not None and len(images) > 0
    has_unlabelled = unlabelled is not None and len(unlabelled) > 0
    target = torch.from_numpy(np.asarray(labels)).long() if has_labels else None
    used_pseudo = 0
    for _ in range(config.steps):
        frozen_statistics(model)
        loss = torch.zeros(())
        if has_labels:
            index = balanced_draw(np.asarray(labels), config.batch_size, generator)
            batch = torch.stack([weak(images[i]) for i in index])
            loss = loss + nn.functional.cross_entropy(model(batch), target[index], label_smoothing=config.label_smoothing)
        if has_unlabelled:
            index = torch.randint(len(unlabelled), (config.batch_size,), generator=generator)
            with torch.no_grad():
                model.eval()
                probs = torch.softmax(model(unlabelled[index]), 1)
                frozen_statistics(model)
            confidence, pseudo = probs.max(1)
            keep = confidence >= config.pseudo_threshold
            if keep.any():
                views = torch.stack([strong(unlabelled[i]) for i in index[keep]])
                loss = loss + nn.functional.cross_entropy(model(views), pseudo[keep]) * keep.float().mean()
                used_pseudo += int(keep.sum())
        if config.to_source:
            loss = loss + config.to_source * sum(((p - source[n]) ** 2).sum() for n, p in model.named_parameters())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress:
            progress(1)
    model.eval()
    return {"steps": config.steps, "pseudo_labels_used": used_pseudo}
