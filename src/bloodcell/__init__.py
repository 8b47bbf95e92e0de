"""bloodcell: curate, train, evaluate and serve peripheral blood cell classifiers.

Layers, top to bottom (each imports only those below it): ``cli``, ``service``, ``workflows``,
``curation`` and ``training``, ``evaluation``, ``inference``, ``models``, ``data``, ``core``.
"""

from .core.classes import CLASS_NAMES
from .core.errors import BloodcellError

__version__ = "0.7.1"
__all__ = ["CLASS_NAMES", "BloodcellError", "__version__"]
