"""Models: the custom CNN and timm backbones behind one uint8-in, logits-out :class:`Classifier`."""

from .batchnorm import has_folded_batchnorm, recalibrate_folded_batchnorm
from .checkpoint import (
    build_from_contract,
    load_checkpoint,
    load_model,
    load_shift_head,
    save_checkpoint,
    save_shift_head,
)
from .factory import (
    Classifier,
    CNNConfig,
    CustomCNN,
    create_backbone,
    create_model,
    merge_subclasses,
    subclass_merge_mask,
)
from .padding import freeze_same_padding
from .shift import (
    OOD_THRESHOLD,
    SHIFT_FILE,
    ClassifierWithShift,
    ShiftHead,
    batch_shift,
    fit_shift_head,
    out_of_distribution,
)

__all__ = [
    "OOD_THRESHOLD",
    "SHIFT_FILE",
    "CNNConfig",
    "Classifier",
    "ClassifierWithShift",
    "CustomCNN",
    "ShiftHead",
    "batch_shift",
    "build_from_contract",
    "create_backbone",
    "create_model",
    "fit_shift_head",
    "freeze_same_padding",
    "has_folded_batchnorm",
    "load_checkpoint",
    "load_model",
    "load_shift_head",
    "merge_subclasses",
    "out_of_distribution",
    "recalibrate_folded_batchnorm",
    "save_checkpoint",
    "save_shift_head",
    "subclass_merge_mask",
]
