"""bloodcell: curate, train, evaluate and serve peripheral blood cell classifiers."""

from .data import CLASS_NAMES, BloodcellError

__version__ = "0.1.0"
__all__ = ["CLASS_NAMES", "BloodcellError", "__version__"]
