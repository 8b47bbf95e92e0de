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

from ..core.errors import BloodcellError
from .batchnorm import use_per_image_norm


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
                 subclass_parents: list[int] | None = None, input_norm: str | None = None):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise BloodcellError(f"unknown input normalisation {input_norm!r}; one of {', '.join(map(str, INPUT_NORMS))}")
        self.net = net
        self.input_norm = input_norm
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))
        # Not in the state dict: a constant of the "grey" input, so every saved model loads as before.
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_to_lms", torch.tensor(RGB_TO_LMS), persistent=False)
        self.register_buffer("log_lms_to_lab", torch.tensor(LOG_LMS_TO_LAB), persistent=False)
        self.register_buffer("lms_to_rgb", torch.linalg.inv(self.rgb_to_lms), persistent=False)
        self.register_buffer("lab_to_log_lms", torch.linalg.inv(self.log_lms_to_lab), persistent=False)
        self.register_buffer("reference", torch.tensor(REINHARD_REFERENCE), persistent=False)
        # With subclasses the network scores each subclass; the classifier still answers with
        # classes, unless training asks for the subclasses' own logits (emit_subclasses).
        self.emit_subclasses = False
        self.register_buffer("subclass_mask", subclass_merge_mask(subclass_parents) if subclass_parents is not None else None)

    def reinhard(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's colours standardised as Reinhard et al.'s colour transfer does (as Chossegros et al.
        2024 put every lab's white cells into one colour style): in l-alpha-beta space, each channel's
        mean and standard deviation over the image are made the reference's; then back to RGB 0-255."""
        def mix(matrix: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a 3 x 3 matrix on the channel axis
            return (matrix.view(1, 3, 3, 1, 1) * t.unsqueeze(1)).sum(2)

        lab = mix(self.log_lms_to_lab, torch.log(mix(self.rgb_to_lms, x.clamp_min(1.0) / 255.0)))
        mean, std = lab.mean(dim=(2, 3), keepdim=True), lab.std(dim=(2, 3), keepdim=True)
        lab = (lab - mean) / (std + 1e-4) * self.reference[1].view(1, 3, 1, 1) + self.reference[0].view(1, 3, 1, 1)
        rgb = mix(self.lms_to_rgb, torch.exp(mix(self.lab_to_log_lms, lab)))
        return (rgb * 255.0).clamp(0, 255)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB -> the network's input: (x / 255 - mean) / std, folded into one multiply-add.

        With ``input_norm="grey_world"`` each image's channels are first scaled so that their
        means are equal (grey-world colour constancy: a lab's colour cast is taken out). With
        ``"grey"`` the network sees only luminance (ITU-R BT.601 luma in all three channels): a
        colour-blind model, which no lab's stain hue can mislead.
        """
        x = images.float()
        if self.input_norm == "grey_world":
            channel_mean = x.mean(dim=(2, 3), keepdim=True).clamp_min(1.0)
            x = (x * (channel_mean.mean(dim=1, keepdim=True) / channel_mean)).clamp(0, 255)
        elif self.input_norm == "grey":
            x = (x * self.luma).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        elif self.input_norm == "reinhard":
            x = self.reinhard(x)
        return x * self.scale - self.shift

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.normalise(images))
        if self.subclass_mask is None or self.emit_subclasses:
            return logits
        return merge_subclasses(logits, self.subclass_mask)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logit features (N, D): what the last linear layer sees (out-of-distribution scores, adaptation)."""
        x = self.normalise(images)
        if isinstance(self.net, CustomCNN):
            return self.net.head[:2](self.net.blocks(x))  # pool, flatten
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def last_layer(self) -> nn.Linear:
        return self.net.head[-1] if isinstance(self.net, CustomCNN) else self.net.get_classifier()

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits from pre-logit features, as :meth:`forward` gives them in eval mode."""
        logits = self.last_layer()(features)
        if self.subclass_mask is None or self.emit_subclasses:
            return logits
        return merge_subclasses(logits, self.subclass_mask)


INPUT_NORMS = (None, "grey_world", "grey", "reinhard")
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's convert("L")
# Reinhard et al. (2001) colour transfer: RGB -> LMS cone space -> log -> l-alpha-beta, decorrelated axes.
RGB_TO_LMS = ((0.3811, 0.5783, 0.0402), (0.1967, 0.7244, 0.0782), (0.0241, 0.1288, 0.8444))
LOG_LMS_TO_LAB = ((1 / 3**0.5, 1 / 3**0.5, 1 / 3**0.5), (1 / 6**0.5, 1 / 6**0.5, -2 / 6**0.5), (1 / 2**0.5, -1 / 2**0.5, 0.0))
# Where every image's l-alpha-beta channel means and standard deviations are moved: the averages over
# PBC training crops as the shipped model frames them (6,000 images; /work/runs/s20/reinhard_ref.py).
REINHARD_REFERENCE = ((-0.6486, -0.0114, 0.0269), (0.5710, 0.2015, 0.0148))


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
            f"(a file in $BLOODCELL_WEIGHTS such as {name}*.safetensors), or run with a network so timm can download them "
            f"({type(exc).__name__}); use --set pretrained=false to train from scratch"
        ) from None


def create_model(
    name: str,
    num_classes: int,
    weights: str | Path | None = None,
    pretrained: bool = True,
    cnn: CNNConfig | None = None,
    subclass_parents: list[int] | None = None,
    input_norm: str | None = None,
    per_image_norm: int = 0,
) -> tuple[Classifier, dict]:
    """Build a classifier and its preprocessing contract (mean, std, interpolation).

    ``subclass_parents`` (each subclass's class index) makes the network score subclasses
    and the classifier merge them back into ``num_classes`` classes. ``per_image_norm`` makes the
    BatchNorms of the first that many stages normalise each image by its own statistics
    (:func:`bloodcell.models.batchnorm.use_per_image_norm`).
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
    if per_image_norm:
        try:
            use_per_image_norm(net, per_image_norm)
        except ValueError as exc:
            raise BloodcellError(f"per_image_norm: {exc}") from None
    return Classifier(net, contract["mean"], contract["std"], subclass_parents, input_norm), contract
