"""Adapting a trained model to one lab's cells: a few labelled ones, or any number of unlabelled ones.

Labelled cells fine-tune every layer for a fixed number of small steps, starting from the trained model
and pulled back towards it (L2-SP: a penalty on the distance to the starting weights, Li et
al. 2018), with every BatchNorm's statistics frozen. Measured on Jiangxi Tecom with the
shipped model (docs/experiments.md): letting BatchNorm re-estimate its statistics on the
lab's few cells kept the lab's accuracy but dropped PBC from 99% to 62%; frozen, PBC kept 88%.

- Labelled cells are drawn class-balanced (a lab has many neutrophils and one basophil),
  with light augmentation and label smoothing.
- Unlabelled cells move the lab's mean pre-logit feature onto the training lab's, in the last
  layer's bias (:func:`align_feature_mean`). Pseudo-label self-training (FixMatch, Sohn et al.
  2020) was measured first and collapsed: from a model right on half of a lab's cells, its
  confident answers teach the wrong half.

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


class AdaptConfig(BaseModel):
    steps: int = Field(150, ge=1, description="optimizer steps (batches)")
    batch_size: int = Field(32, ge=2)
    lr: float = Field(3e-4, gt=0)
    to_source: float = Field(1e-2, ge=0, description="L2-SP: weight of the squared distance to the trained weights")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    lab_frequencies: bool = Field(False, description="with unlabelled cells beside labelled ones: estimate the lab's class "
                                  "frequencies on them (EM) and correct for them; measured neutral on Jiangxi Tecom")
    augment: AugmentConfig = Field(default_factory=light_augment)


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


def finetune(model: nn.Module, images: torch.Tensor, labels: np.ndarray, config: AdaptConfig | None = None,
             progress: Callable[[int], None] | None = None) -> dict:
    """Fine-tune ``model`` in place on a lab's labelled cells: prepared uint8 (N, 3, S, S) images and
    their labels in the model's class indices. Returns what it did."""
    config = config or AdaptConfig()
    if images is None or len(images) == 0:
        raise ValueError("no labelled cells to adapt on")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    weak = build_transform(config.augment, images.shape[-1]) or (lambda image: image)  # None: augmentation off
    source = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    target = torch.from_numpy(np.asarray(labels)).long()
    for _ in range(config.steps):
        frozen_statistics(model)
        index = balanced_draw(np.asarray(labels), config.batch_size, generator)
        batch = torch.stack([weak(images[i]) for i in index])
        loss = nn.functional.cross_entropy(model(batch), target[index], label_smoothing=config.label_smoothing)
        if config.to_source:
            loss = loss + config.to_source * sum(((p - source[n]) ** 2).sum() for n, p in model.named_parameters())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress:
            progress(1)
    model.eval()
    return {"method": "finetune", "steps": config.steps}


@torch.no_grad()
def align_feature_mean(model: nn.Module, unlabelled: torch.Tensor, source_mean: torch.Tensor,
                       batch_size: int = 128) -> dict:
    """Move the lab's mean pre-logit feature onto the training lab's, in the last layer's bias.

    ``W (f - m_lab + m_source) + b = W f + (b + W (m_source - m_lab))``: the network's answer
    on a lab cell becomes its answer on that cell's features shifted by the difference of the
    two labs' mean features. Nothing else changes, so it cannot collapse; measured on Jiangxi
    Tecom it moved the shipped model from 52.7% to 59.7% (docs/experiments.md), where
    pseudo-label self-training (FixMatch-style) collapsed to 17.7%.
    """
    model.eval()
    features = torch.cat([model.features(unlabelled[i : i + batch_size]) for i in range(0, len(unlabelled), batch_size)])
    layer = model.last_layer()
    shift = source_mean.to(features.dtype) - features.mean(0)
    layer.bias += layer.weight @ shift
    return {"method": "feature mean alignment", "cells": len(unlabelled), "shift_norm": float(shift.norm())}


def least_certain(probabilities: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` answers with the smallest margin between the two most likely classes,
    least certain first (margin sampling, Scheffer et al. 2001): the cells worth a person's label next."""
    probabilities = np.asarray(probabilities)
    if len(probabilities) == 0 or count <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.sort(probabilities, axis=1)
    margin = top[:, -1] - (top[:, -2] if probabilities.shape[1] > 1 else 0.0)
    return np.argsort(margin, kind="stable")[:count]


def estimate_class_prior(probabilities: np.ndarray, trained_prior: np.ndarray, iterations: int = 100,
                         floor: float = 0.005) -> np.ndarray:
    """A lab's class frequencies from a model's answers on its unlabelled cells (EM, Saerens et al. 2002).

    ``probabilities`` (N, C) are the model's posteriors under ``trained_prior``; each step
    re-weights them by the current prior estimate over the trained one and averages. Classes
    are kept at ``floor`` at least, so a class the sample lacks stays possible.
    """
    trained_prior = np.asarray(trained_prior, dtype=np.float64)
    prior = trained_prior.copy()
    for _ in range(iterations):
        weighted = probabilities * (prior / trained_prior)
        weighted /= weighted.sum(1, keepdims=True)
        prior = weighted.mean(0)
    prior = np.maximum(prior, floor)
    return prior / prior.sum()


@torch.no_grad()
def shift_class_prior(model: nn.Module, prior: np.ndarray, trained_prior: np.ndarray, parents: list[int] | None) -> None:
    """Put log(prior / trained prior) into the last layer's bias: the label-shift correction.

    ``parents`` maps a subclass model's outputs to their classes (each subclass gets its class's term).
    """
    correction = torch.from_numpy(np.log(np.asarray(prior) / np.asarray(trained_prior))).float()
    if parents is not None:
        correction = correction[torch.as_tensor(parents)]
    model.last_layer().bias += correction
