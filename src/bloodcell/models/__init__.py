"""Models: the custom CNN and timm backbones behind one uint8-in, logits-out :class:`Classifier`."""

from .batchnorm import has_folded_batchnorm, recalibrate_folded_batchnorm
from .checkpoint import build_from_contract, load_checkpoint, load_model, load_shift_head, save_checkpoint, save_shift_head
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
from .shift import SHIFT_FILE, ClassifierWithShift, ShiftHead, batch_shift, fit_shift_head

__all__ = [
    "has_folded_batchnorm", "recalibrate_folded_batchnorm", "build_from_contract", "load_checkpoint", "load_model",
    "save_checkpoint", "Classifier", "CNNConfig", "CustomCNN", "create_backbone", "create_model", "merge_subclasses",
    "subclass_merge_mask", "freeze_same_padding", "load_shift_head", "save_shift_head", "SHIFT_FILE", "ClassifierWithShift", "ShiftHead", "batch_shift",
    "fit_shift_head",
]
