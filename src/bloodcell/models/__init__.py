"""Models: the custom CNN and timm backbones behind one uint8-in, logits-out :class:`Classifier`.

Names are loaded on first use (PEP 562), so that reading a contract or an out-of-distribution
score (:mod:`bloodcell.models.ood`) never imports PyTorch: prediction with an ONNX model starts
a second faster without it.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_WHERE = {
    'has_folded_batchnorm': 'batchnorm',
    'recalibrate_folded_batchnorm': 'batchnorm',
    'build_from_contract': 'checkpoint',
    'load_checkpoint': 'checkpoint',
    'load_model': 'checkpoint',
    'load_shift_head': 'checkpoint',
    'save_checkpoint': 'checkpoint',
    'save_shift_head': 'checkpoint',
    'CNNConfig': 'factory',
    'Classifier': 'factory',
    'CustomCNN': 'factory',
    'create_backbone': 'factory',
    'create_model': 'factory',
    'merge_subclasses': 'factory',
    'subclass_merge_mask': 'factory',
    'OOD_THRESHOLD': 'ood',
    'batch_shift': 'ood',
    'out_of_distribution': 'ood',
    'freeze_same_padding': 'padding',
    'ClassifierWithShift': 'shift',
    'SHIFT_FILE': 'shift',
    'ShiftHead': 'shift',
    'fit_shift_head': 'shift',
}

if TYPE_CHECKING:
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
    from .ood import OOD_THRESHOLD, batch_shift, out_of_distribution
    from .padding import freeze_same_padding
    from .shift import SHIFT_FILE, ClassifierWithShift, ShiftHead, fit_shift_head


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
