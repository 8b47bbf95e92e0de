"""Learning-rate schedules and the per-epoch data loader, both reproducible from (seed, epoch)."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from ..data.splits import Split, TensorImages
from .config import PhaseConfig, TrainConfig


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

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
