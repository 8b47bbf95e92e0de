"""Data: reading datasets (class folders, .npz), their layouts, and the one preprocessing path.

Also the training augmentations, the corruption families of the robustness test and
synthetic contaminants for tests and benchmarks (imported from their modules).
"""

from ..core.classes import CLASS_NAMES
from ..core.errors import BloodcellError, ImageReadError
from .layout import DatasetLayout, check_source, evaluation_source, find_layout, training_sources
from .preprocess import RESIZE_METHOD, preprocess, preprocess_batch
from .sources import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    Batch,
    Item,
    Source,
    decode_bytes,
    decode_file,
    decode_stream,
    iter_batches,
    load_item,
    open_source,
)

__all__ = [
    "CLASS_NAMES", "BloodcellError", "ImageReadError", "DatasetLayout", "check_source", "evaluation_source",
    "find_layout", "training_sources", "RESIZE_METHOD", "preprocess", "preprocess_batch", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS",
    "Batch", "Item", "Source", "decode_bytes", "decode_file", "decode_stream", "iter_batches", "load_item",
    "open_source",
]
