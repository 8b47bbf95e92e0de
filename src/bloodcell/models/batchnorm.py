"""Folded BatchNorm (TFLite-style weights): detect it, and give it real statistics before fine-tuning."""

from __future__ import annotations

import functools

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

    Layers that normalise per image (:func:`use_per_image_norm`) are measured as the identity
    BatchNorms they replaced; with the same weight and bias they then rescale each image's
    standardised channels to the training images' spread, which for a typical image is again
    the pretrained function.
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
    per_image = [bn for bn in layers if isinstance(bn, _PerImage)]
    was_training = model.training
    model.eval()
    for bn in per_image:  # measured as the identity BatchNorms they replaced: the pretrained function
        bn.per_image = False
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        for bn in per_image:
            del bn.per_image
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


class _PerImage:
    """Normalise each image by its own channel statistics (instance normalisation), with the BatchNorm's affine.

    Mixed into a BatchNorm class by :func:`use_per_image_norm`, which changes a layer's class in
    place: its parameters, buffers and state-dict keys stay a BatchNorm's, so a pretrained
    network's layers convert as they are and checkpoints load either way. In early layers this
    takes a lab's contrast and colour cast out of the features, in training and at test time
    alike (IBN-Net, Pan et al. 2018; GroupNorm across microscopes, Tsutsui et al. 2023). The
    running statistics are unused, except while :func:`recalibrate_folded_batchnorm` measures a
    pretrained network (``per_image`` off: the layer is then the BatchNorm it replaced).
    """

    per_image = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_image:
            return super().forward(x)
        x = nn.functional.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        if hasattr(self, "act"):  # timm's BatchNormAct2d: dropout and activation follow the norm
            x = self.act(self.drop(x))
        return x


class PerImageNorm(_PerImage, nn.BatchNorm2d):
    pass


@functools.cache
def _per_image_class(base: type) -> type:
    if base is nn.BatchNorm2d:
        return PerImageNorm
    return type(f"PerImage{base.__name__}", (_PerImage, base), {"__module__": __name__})


def per_image_norm_layers(net: nn.Module, stages: int) -> list[nn.BatchNorm2d]:
    """The BatchNorms of the first ``stages`` stages: the stem, then one block per stage.

    For timm's EfficientNet-style backbones (``conv_stem``, ``bn1``, ``blocks``; MobileNetV3
    among them) and the custom CNN (``blocks``, each a stage).
    """
    if stages <= 0:
        return []
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(net).__name__}: per-image normalisation needs a network with blocks")
    parts = [net.bn1, *list(blocks)[: stages - 1]] if hasattr(net, "bn1") else list(blocks)[:stages]
    return [m for part in parts for m in part.modules() if isinstance(m, nn.BatchNorm2d)]


def use_per_image_norm(net: nn.Module, stages: int) -> int:
    """Make the BatchNorms of the first ``stages`` stages normalise per image (:class:`_PerImage`); returns how many."""
    layers = per_image_norm_layers(net, stages)
    for layer in layers:
        if not isinstance(layer, _PerImage):
            layer.__class__ = _per_image_class(type(layer))
    return len(layers)
