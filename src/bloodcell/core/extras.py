"""Optional extras: a feature whose packages are missing says which extra to install, in one line."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

# module -> the extra that brings it
EXTRAS = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "python_multipart": "serve",
    "onnx": "export",
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise a one-line :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module.split(".")[0], "dev")
        raise MissingExtraError(
            f"{feature} needs the '{extra}' extra ({module} is not installed): pip install 'bloodcell[{extra}]'"
        ) from None
