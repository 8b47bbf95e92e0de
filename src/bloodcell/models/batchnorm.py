"""Folded BatchNorm (TFLite-style weights): detect it, and give it real statistics before fine-tuning."""

from __future__ import annotations

import torch
from torch import nn


def batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_folded_batchnorm(model: nn.Module) -> bool:
    """True when every BatchNorm only adds its bias (TFLite-style weights: scale folded into the convs).

    Such layers have weight 1, running mean 0 and running variance 1 - eps, so
    they normalise nothing; the bias holds the folded convolution bias.
    """
    layers = batchnorms(model)
    if not layers:
        return False
    for bn in layers:
        if not (
            torch.all(bn.weight == 1)
            and torch.all(bn.running_mean == 0)
            and torch.allclose(bn.running_var, torch.full_like(bn.running_var, 1 - bn.eps), atol=1e-6)
        ):
            return False
    return True


@torch.no_grad()
def recalibrate_folded_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> int:
    """Give identity BatchNorms real statistics without changing the eval-mode function.

    For each BatchNorm with input mean m and variance v (measured on ``images``):
    running_mean=m, running_var=v, weight=sqrt(v+eps), bias=bias+m.  In eval mode
    (x-m)/sqrt(v+eps)*sqrt(v+eps) + bias + m = x + bias, as before; in train mode
    the batch statistics now match the running ones, so fine-tuning does not wreck
    the pretrained features.  Because the function is unchanged, all layers'
    inputs can be measured in one pass.  Returns the number of layers set.
    """
    layers = batchnorms(model)
    sums: dict[nn.Module, list[torch.Tensor]] = {bn: [0.0, 0.0, 0] for bn in layers}

    def hook(module, inputs, _output):
        x = inputs[0].double()
        dims = [0] + list(range(2, x.dim()))
        acc = sums[module]
        acc[0] = acc[0] + x.sum(dim=dims)
        acc[1] = acc[1] + (x * x).sum(dim=dims)
        acc[2] += x.numel() // x.shape[1]

    handles = [bn.register_forward_hook(hook) for bn in layers]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for bn in layers:
        total, total_sq, count = sums[bn]
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.add_(mean)
    return len(layers)
