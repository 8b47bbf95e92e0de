"""Random convolutions of the network's input, for training only.

A lab's stain, lamp, camera and focus change a cell's local colour and texture, not its shape.
RandConv (Xu et al., ICLR 2021, "Robust and generalizable visual representation learning via
random convolutions"), a published single-source domain-generalisation method, draws such
changes at random: each image is convolved with a random filter (kernel size drawn from
``kernel_sizes``, weights from He's normal initialisation), and mixed with itself by a weight
drawn from U(0, 1) (their "RC_mix"). Progressive RandConv (Choi et al., CVPR 2023: one 3 x 3
filter applied repeatedly) was tried and left out: without its deformable offsets, repeated
random filters turned many cells into noise.

Each image of the batch draws its own filter (one grouped convolution for the batch), and each
is left as it is with probability ``1 - p``. The output is moved back to the input image's own
channel means and standard deviations, so that only texture and colour mixing change, not the
input's overall level. Acts through a forward pre-hook on the network, in training mode only:
evaluation, export and every saved weight are unchanged (the hook holds no parameters).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn


class RandomConvConfig(BaseModel):
    p: float = Field(0.5, ge=0, le=1, description="probability, per image, of a random convolution")
    kernel_sizes: list[int] = Field(default_factory=lambda: [1, 3, 5, 7], description="the kernel sizes drawn from (odd)")


def _per_image_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Convolve image i of (N, C, H, W) with weight[i] of (N, C, C, k, k), one grouped convolution."""
    n, c, h, w = x.shape
    k = weight.shape[-1]
    out = F.conv2d(x.reshape(1, n * c, h, w), weight.reshape(n * c, c, k, k), padding=k // 2, groups=n)
    return out.reshape(n, c, h, w)


def _match_stats(y: torch.Tensor, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``y`` with each image's channel means and standard deviations made those of ``x``."""
    y_mean, y_std = y.mean(dim=(2, 3), keepdim=True), y.std(dim=(2, 3), keepdim=True)
    x_mean, x_std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True)
    return (y - y_mean) / (y_std + eps) * x_std + x_mean


class RandomConv:
    """The augmentation: ``RandomConv(config)(x)`` for a batch (N, C, H, W) of network inputs."""

    def __init__(self, config: RandomConvConfig):
        if any(k < 1 or k % 2 == 0 for k in config.kernel_sizes):
            raise ValueError(f"random_conv.kernel_sizes must be odd and positive, not {config.kernel_sizes}")
        self.config = config

    def randconv(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        sizes = self.config.kernel_sizes
        k = sizes[int(torch.randint(len(sizes), ()).item())]
        weight = torch.randn(n, c, c, k, k, device=x.device, dtype=x.dtype) * math.sqrt(2.0 / (c * k * k))
        y = _match_stats(_per_image_conv(x, weight), x)
        alpha = torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype)
        return alpha * x + (1 - alpha) * y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or self.config.p == 0:
            return x
        out = self.randconv(x)
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.config.p
        return torch.where(keep, x, out)


def add_random_conv(net: nn.Module, config: RandomConvConfig):
    """Register the pre-hook on ``net``: its input is convolved at random in training mode only."""
    augment = RandomConv(config)

    def hook(module: nn.Module, args):
        if not module.training:
            return None
        with torch.no_grad():
            return (augment(args[0]), *args[1:])

    return net.register_forward_pre_hook(hook)
