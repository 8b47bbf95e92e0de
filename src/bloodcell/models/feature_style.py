"""Feature-statistics augmentation in the network's early blocks, for training only.

A lab's stain, lamp and camera show up in the channel means and standard deviations of the
early feature maps (instance statistics carry "style"; Huang & Belongie 2017). Two published
single-source domain-generalisation methods perturb them while training:

- ``mixstyle`` (Zhou et al., ICLR 2021): each image's statistics are mixed with another
  image's of the batch, with weights drawn from Beta(alpha, alpha);
- ``dsu`` (Li et al., ICLR 2022, "Uncertainty modeling for out-of-distribution generalization"):
  each image's statistics are moved by Gaussian noise as wide as those statistics vary
  across the batch, so styles beyond the training lab's are drawn too.

Both act only in training mode, through forward hooks on the chosen blocks: evaluation, export
and every saved weight are unchanged (the hooks hold no parameters).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn


class FeatureStyleConfig(BaseModel):
    kind: Literal["mixstyle", "dsu"] = "dsu"
    p: float = Field(0.5, ge=0, le=1, description="probability, per batch and block, of perturbing the statistics")
    alpha: float = Field(0.1, gt=0, description="mixstyle: the Beta(alpha, alpha) of the mixing weights")
    blocks: list[int] = Field(default_factory=lambda: [0, 1, 2], description="backbone blocks whose outputs are perturbed")


class FeatureStyle:
    """The hook: ``hook(module, inputs, output)`` returns the perturbed output in training mode."""

    def __init__(self, config: FeatureStyleConfig, eps: float = 1e-6):
        self.config = config
        self.eps = eps

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or output.dim() != 4 or output.shape[0] < 2:
            return None
        if torch.rand(()).item() >= self.config.p:
            return None
        return self.perturb(output)

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt()
        normed = (x - mean) / std
        if self.config.kind == "mixstyle":
            mean, std = mean.detach(), std.detach()
            weight = torch.distributions.Beta(self.config.alpha, self.config.alpha).sample((x.shape[0], 1, 1, 1))
            weight = weight.to(x.device, x.dtype)
            order = torch.randperm(x.shape[0], device=x.device)
            new_mean = weight * mean + (1 - weight) * mean[order]
            new_std = weight * std + (1 - weight) * std[order]
        else:
            spread_mean = (mean.var(dim=0, keepdim=True) + self.eps).sqrt()
            spread_std = (std.var(dim=0, keepdim=True) + self.eps).sqrt()
            new_mean = mean + torch.randn_like(mean) * spread_mean
            new_std = std + torch.randn_like(std) * spread_std
        return normed * new_std + new_mean


def add_feature_style(net: nn.Module, config: FeatureStyleConfig) -> list:
    """Register the hooks on ``net.blocks[i]`` for each configured block; returns their handles."""
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(net).__name__} has no blocks to perturb")
    hook = FeatureStyle(config)
    return [blocks[i].register_forward_hook(hook) for i in config.blocks]
