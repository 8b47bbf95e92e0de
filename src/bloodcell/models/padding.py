"""Static 'SAME' padding for export: timm's run-time padding becomes constant Conv pads."""

from __future__ import annotations

import torch
from torch import nn


class _StaticPadConv2d(nn.Conv2d):
    """A TensorFlow-'SAME' convolution whose padding was worked out once, for one input size."""

    pads: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(nn.functional.pad(x, self.pads), self.weight, self.bias)


def freeze_same_padding(net: nn.Module, image_size: int) -> int:
    """Make timm's dynamic 'SAME' padding static for ``image_size`` inputs; returns how many convs changed.

    timm's tf_* models pad each strided convolution by an amount computed from the
    input's shape at run time; traced to ONNX, that is a chain of Shape/Gather/Ceil/
    Pad nodes per convolution that ONNX Runtime runs on every call.  The exported
    model has a fixed input size, so the padding can be a constant that ONNX Runtime
    fuses into the convolution.  Outputs are unchanged (tested).
    """
    from timm.layers.padding import get_same_padding

    same = [m for m in net.modules() if type(m).__name__ == "Conv2dSame"]
    sizes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: sizes.__setitem__(mod, tuple(args[0].shape[-2:])))
             for m in same]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8))
    finally:
        for hook in hooks:
            hook.remove()
    for conv in same:
        height, width = sizes[conv]
        pad_h = get_same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pad_w = get_same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        conv.__class__ = _StaticPadConv2d
        conv.pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    return len(same)
