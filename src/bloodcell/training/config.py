"""Typed training settings: phases, subclasses, progressive resizing, and the run's config.

The defaults are policy and live here, not in the CLI: ``TrainConfig(model="cnn")`` trains the custom
CNN in one phase from scratch, exactly as ``bloodcell train --model cnn`` does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..core.errors import BloodcellError
from ..data.augment import AugmentConfig
from ..data.framing import FramingConfig
from ..models import CNNConfig
from ..models.feature_style import FeatureStyleConfig
from ..models.random_conv import RandomConvConfig
from .distill import DistillConfig


class PhaseConfig(BaseModel):
    """One fine-tuning phase: which part of the network learns, at what rate, for how long."""

    name: str
    epochs: int = Field(ge=0)
    lr: float = Field(gt=0)
    trainable: str = Field("all", description="'head', 'all', or 'top:N' (the head and the last N blocks)")

    @model_validator(mode="after")
    def _check_trainable(self):
        if self.trainable not in ("head", "all") and not (
            self.trainable.startswith("top:") and self.trainable[4:].isdigit()
        ):
            raise ValueError(f"trainable must be 'head', 'all' or 'top:N', got {self.trainable!r}")
        return self


class SubclassConfig(BaseModel):
    """Train on the subclasses that file names carry, answer with their classes.

    PBC names each file after its cell type: ``BNE_`` band and ``SNE_`` segmented neutrophils,
    ``MY_``, ``MMY_``, ``PMY_`` myelocytes, metamyelocytes and promyelocytes in the immature
    granulocyte folder. A band neutrophil looks more like a metamyelocyte than like a segmented
    neutrophil; one "neutrophil" target asks the network to put two unlike groups together.
    """

    pattern: str = Field(r"^([A-Za-z]+)_", description="regular expression on the file name; its first group names the subclass")
    min_images: int = Field(50, ge=1, description="a subclass with fewer training images stays in its class's remainder")

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            groups = re.compile(pattern).groups
        except re.error as exc:
            raise ValueError(f"not a regular expression: {pattern!r} ({exc})") from None
        if groups < 1:
            raise ValueError(f"{pattern!r} has no group: put the subclass name in parentheses, e.g. ^([A-Za-z]+)_")
        return pattern


class ProgressiveConfig(BaseModel):
    """Progressive resizing (fastai's, EfficientNetV2's "progressive learning"): train the first
    epochs on smaller crops, which cost fewer pixels, and grow them to ``image_size``.

    The images are stored at ``image_size`` either way; only the training crop's output size
    changes (the random resized crop, or a resize where zoom is off), so validation, the
    checkpoint and the exported model always see ``image_size``.
    """

    start_size: int = Field(96, ge=16, description="crop size of the first epoch")
    epochs: int = Field(20, ge=1, description="epochs (counted over all phases) over which the size grows to image_size")
    step: int = Field(16, ge=1, description="sizes are multiples of this (whole blocks of the network's stride)")


def epoch_image_size(config: "TrainConfig", epoch_index: int) -> int:
    """The training crop size of epoch ``epoch_index`` (1-based): a linear ramp from the progressive
    start size to ``image_size`` over ``progressive.epochs`` epochs, in multiples of ``step``."""
    ramp = config.progressive
    if ramp is None or epoch_index > ramp.epochs:
        return config.image_size
    fraction = (epoch_index - 1) / ramp.epochs
    size = ramp.start_size + fraction * (config.image_size - ramp.start_size)
    return min(config.image_size, max(ramp.step, int(round(size / ramp.step)) * ramp.step))


# The custom CNN learns from scratch: one phase, every layer, a higher rate.
CNN_PHASES = [{"name": "train", "epochs": 30, "lr": 3e-3, "trainable": "all"}]


class TrainConfig(BaseModel):
    data: Path | None = Field(None, description="curated data (the output of `bloodcell curate`), or train/ and val/ folders")
    model: str = "tf_mobilenetv3_small_100"
    weights: Path | None = None
    pretrained: bool = True
    image_size: int = Field(128, ge=16, le=1024)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    out: Path | None = None
    phases: list[PhaseConfig] = Field(
        default_factory=lambda: [
            PhaseConfig(name="head", epochs=3, lr=3e-3, trainable="head"),
            PhaseConfig(name="finetune", epochs=12, lr=1e-3, trainable="top:4"),
        ]
    )
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["plateau", "cosine"] = "plateau"
    plateau_factor: float = Field(0.3, gt=0, lt=1)
    plateau_patience: int = Field(2, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    monitor: Literal["val_macro_f1", "val_accuracy", "val_loss"] = "val_macro_f1"
    early_stopping_patience: int = Field(5, ge=1)
    keep: Literal["best", "last"] = Field(
        "best", description="which epoch's weights best.safetensors holds: the best on `monitor`, or the last epoch's "
        "(over ten full recipes neither was better on average: docs/experiments.md, fifth session)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup_alpha: float = Field(
        0.0, ge=0, description="MixUp (Zhang et al. 2018): each training batch blended with itself rolled by one, "
        "weights from Beta(alpha, alpha), labels likewise (torchvision's references/classification --mixup-alpha); 0: off")
    cutmix_alpha: float = Field(
        0.0, ge=0, description="CutMix (Yun et al. 2019): a box of the rolled batch pasted in, labels by area "
        "(--cutmix-alpha); 0: off. With both set, each batch gets one of the two, as in torchvision's references")
    class_weights: bool | Path = True
    balanced_sampler: bool = False
    grad_clip: float | None = None
    ema_decay: float | None = Field(None, gt=0, lt=1)
    ema_buffers: Literal["averaged", "live"] = Field(
        "averaged", description="the EMA model's BatchNorm statistics: averaged like its weights (torchvision's "
        "references, timm), or copied from the live model (runs 13-15: EMA validation near chance until the weights settle)")
    augment: AugmentConfig = AugmentConfig()
    framing: FramingConfig | None = Field(None, description="crop a window around the stained cell before the resize (bloodcell.data.framing)")
    input_norm: Literal["grey_world", "grey", "reinhard"] | None = Field(
        None, description="inside the network: grey-world colour constancy (each image's channel means made equal), "
        "grey (luminance only: a colour-blind model), reinhard (each image's l-alpha-beta colour statistics "
        "standardised, Reinhard et al. 2001), or none")
    per_image_norm: int = Field(
        0, ge=0, description="the BatchNorms of the stem and the first blocks (this many stages in all) normalise each "
        "image by its own channel statistics (instance normalisation, as IBN-Net), in training and at test time; 0: none")
    feature_style: FeatureStyleConfig | None = Field(
        None, description="perturb the early blocks' feature statistics while training (MixStyle or DSU; "
        "bloodcell.models.feature_style), or none")
    random_conv: RandomConvConfig | None = Field(
        None, description="convolve training inputs with random filters (RandConv or progressive RandConv; "
        "bloodcell.models.random_conv), or none")
    subclasses: SubclassConfig | None = Field(None, description="train on subclasses named in the file names (SubclassConfig)")
    progressive: ProgressiveConfig | None = Field(None, description="progressive resizing of the training crops (ProgressiveConfig)")
    distill: DistillConfig | None = Field(None, description="learn from teachers' probabilities as well (bloodcell.training.distill)")
    cnn: CNNConfig = CNNConfig()
    workers: int = Field(0, ge=0, description="DataLoader worker processes; 0 augments in-process, faster on 2 cores (benchmarks/train_throughput.py)")
    recalibrate_images: int = Field(512, ge=1, description="training images used to recalibrate folded BatchNorm")

    @model_validator(mode="before")
    @classmethod
    def _policy_defaults(cls, values):
        """The custom CNN trains in one phase unless phases are given (two-phase fine-tuning is for pretrained backbones)."""
        if isinstance(values, dict) and values.get("model") == "cnn" and values.get("phases") is None:
            values = {**values, "phases": CNN_PHASES}
        return values

    @property
    def epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    @model_validator(mode="after")
    def _check_mixing(self):
        if (self.mixup_alpha or self.cutmix_alpha) and self.distill is not None:
            raise ValueError("mixup_alpha and cutmix_alpha mix the labels, not the teachers' targets: leave them at 0 with distill")
        return self

    @model_validator(mode="after")
    def _check_progressive(self):
        if self.progressive is not None and self.progressive.start_size > self.image_size:
            raise ValueError(f"progressive.start_size {self.progressive.start_size} is larger than image_size {self.image_size}")
        if self.progressive is not None and self.progressive.epochs >= self.epochs:
            raise ValueError(f"progressive.epochs {self.progressive.epochs} leaves no epoch at image_size "
                             f"(the run has {self.epochs}): the last epochs must train at the size the model is used at")
        return self


def scale_epochs(config: TrainConfig, total: int) -> TrainConfig:
    """Spread ``total`` epochs over the phases in proportion to their configured lengths."""
    if total < len(config.phases):
        raise BloodcellError(f"--epochs {total}: need at least one epoch per phase ({len(config.phases)} phases)")
    current = max(config.epochs, 1)
    counts = [max(1, round(p.epochs * total / current)) for p in config.phases]
    counts[-1] = max(1, total - sum(counts[:-1]))
    phases = [p.model_copy(update={"epochs": n}) for p, n in zip(config.phases, counts)]
    progressive = config.progressive
    if progressive is not None:  # the ramp shrinks with the run, and still ends before its last epoch
        ramp = min(round(progressive.epochs * total / current), total - 1)
        progressive = progressive.model_copy(update={"epochs": ramp}) if ramp >= 1 else None
    return config.model_copy(update={"phases": phases, "progressive": progressive})


def parse_overrides(pairs: list[str]) -> dict:
    """``key.sub=value`` pairs into a nested dict; values parsed as YAML scalars."""
    import yaml

    settings: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise BloodcellError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        node = settings
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return settings


def merge_settings(into, new: dict):
    """Merge nested overrides into settings; a digit key addresses a list item (phases.1.lr)."""
    for key, value in new.items():
        if isinstance(into, list):
            if not key.isdigit() or int(key) >= len(into):
                raise BloodcellError(f"--set: no item {key} in a list of {len(into)}")
            key = int(key)
            current = into[key]
        else:
            current = into.get(key)
        if isinstance(value, dict) and isinstance(current, (dict, list)):
            merge_settings(current, value)
        else:
            into[key] = value
    return into


def load_settings(config: Path | None, overrides: list[str] = ()) -> dict:
    """Settings from a YAML file (or none), with ``key=value`` overrides merged in."""
    import yaml

    settings: dict = {}
    if config is not None:
        config = Path(config)
        if not config.is_file():
            raise BloodcellError(f"{config}: config file not found")
        try:
            settings = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BloodcellError(f"{config}: not valid YAML ({exc})") from None
        if not isinstance(settings, dict):
            raise BloodcellError(f"{config}: expected a mapping of settings at the top level")
    return merge_settings(settings, parse_overrides(list(overrides)))


def build_train_config(config_file: Path | None = None, overrides: list[str] = (), epochs: int | None = None,
                       **fields) -> TrainConfig:
    """A training config as the CLI builds it: a YAML file, then named fields (None: not given), then
    ``key=value`` overrides applied over the defaults too (so ``phases.1.lr`` always has a phase to
    change), then ``epochs`` spread over the phases."""
    settings = load_settings(config_file)
    settings.update({k: v for k, v in fields.items() if v is not None})
    settings = merge_settings(TrainConfig(**settings).model_dump(mode="json"), parse_overrides(list(overrides)))
    config = TrainConfig(**settings)
    return scale_epochs(config, epochs) if epochs is not None else config
