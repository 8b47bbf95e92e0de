"""Models: a configurable custom CNN and any timm backbone, with local pretrained weights.

Every model is wrapped in :class:`Classifier`, which takes uint8 RGB batches
(N, 3, H, W) and applies the model's own normalisation inside the network.  So
the preprocessing contract (input size, mean/std, resize method) travels with
the weights and is the same in training, evaluation, prediction, ONNX export
and the service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from .data import BloodcellError


class CNNConfig(BaseModel):
    """The custom CNN: blocks of (conv-BN-act) x convs_per_block, then max-pool."""

    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256])
    convs_per_block: int = Field(2, ge=1)
    activation: Literal["relu", "silu"] = "silu"
    dropout: float = Field(0.3, ge=0, lt=1)


class CustomCNN(nn.Module):
    def __init__(self, num_classes: int, config: CNNConfig | None = None):
        super().__init__()
        config = config or CNNConfig()
        act = nn.ReLU if config.activation == "relu" else nn.SiLU
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch in config.channels:
            block: list[nn.Module] = []
            for _ in range(config.convs_per_block):
                block += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), act(inplace=True)]
                in_ch = out_ch
            block.append(nn.MaxPool2d(2))
            layers.append(nn.Sequential(*block))
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(in_ch, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class Classifier(nn.Module):
    """uint8 RGB in, logits out: normalisation is part of the network."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 subclass_parents: list[int] | None = None):
        super().__init__()
        self.net = net
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))
        # With subclasses the network scores each subclass; the classifier still answers with
        # classes, unless training asks for the subclasses' own logits (emit_subclasses).
        self.emit_subclasses = False
        self.register_buffer("subclass_mask", subclass_merge_mask(subclass_parents) if subclass_parents is not None else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std, folded into one multiply-add.
        logits = self.net(images.float() * self.scale - self.shift)
        if self.subclass_mask is None or self.emit_subclasses:
            return logits
        return merge_subclasses(logits, self.subclass_mask)


def subclass_merge_mask(parents) -> torch.Tensor:
    """Log of the class-by-subclass membership matrix (classes x subclasses), -inf made finite for ONNX."""
    parents = torch.as_tensor(parents)
    mask = torch.full((int(parents.max()) + 1, len(parents)), -1e4)
    mask[parents, torch.arange(len(parents))] = 0.0
    return mask


def merge_subclasses(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Class logits from subclass logits (or log-probabilities): a class's probability is the sum of
    its subclasses', since softmax of the log-sum-exp over each class's subclasses equals that sum exactly."""
    return torch.logsumexp(logits[:, None, :] + mask, dim=2)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BloodcellError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # Never unpickle arbitrary objects from a file a user hands us.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a plain state dict
        raise BloodcellError(f"{path}: not a plain PyTorch state dict ({exc})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def create_backbone(name: str, weights: str | Path | None, pretrained: bool) -> nn.Module:
    """A timm model with ImageNet weights from ``weights`` or, with a network, timm's hub."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise BloodcellError(f"unknown model {name!r}; 'cnn' or a timm model name such as {', '.join(close) or 'resnet18'}")
    if weights is not None:
        model = timm.create_model(name, pretrained=False, num_classes=1000)
        state = _load_state_dict(Path(weights))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1:3]
            raise BloodcellError(f"{weights}: does not fit {name} ({' '.join(first).strip()})") from None
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=1000)
    try:
        return timm.create_model(name, pretrained=True, num_classes=1000)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise BloodcellError(
            f"no ImageNet weights for {name}: pass a local file with --weights PATH "
            f"(e.g. ../shared/weights/{name}*.safetensors), or run with a network so timm can download them "
            f"({type(exc).__name__}); use --set pretrained=false to train from scratch"
        ) from None


def create_model(
    name: str,
    num_classes: int,
    weights: str | Path | None = None,
    pretrained: bool = True,
    cnn: CNNConfig | None = None,
    subclass_parents: list[int] | None = None,
) -> tuple[Classifier, dict]:
    """Build a classifier and its preprocessing contract (mean, std, interpolation).

    ``subclass_parents`` (each subclass's class index) makes the network score subclasses
    and the classifier merge them back into ``num_classes`` classes.
    """
    outputs = len(subclass_parents) if subclass_parents is not None else num_classes
    if subclass_parents is not None and sorted(set(subclass_parents)) != list(range(num_classes)):
        raise BloodcellError(f"subclasses must cover each of the {num_classes} classes, got parents {subclass_parents}")
    if name == "cnn":
        net = CustomCNN(outputs, cnn)
        contract = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    else:
        import timm.data

        net = create_backbone(name, weights, pretrained)
        # Read the normalisation from the model's own pretrained config, never hard-code it.
        data_config = timm.data.resolve_data_config({}, model=net)
        contract = {"mean": tuple(data_config["mean"]), "std": tuple(data_config["std"])}
        net.reset_classifier(outputs)
    return Classifier(net, contract["mean"], contract["std"], subclass_parents), contract


# ---------------------------------------------------------------- folded BatchNorm


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
