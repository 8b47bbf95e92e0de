"""Where data and weights live: from flags first, then the environment, never hard-coded paths.

- ``BLOODCELL_DATA``: a folder holding datasets (``pbc224/``, ``foreign/``, ``fields/``), as
  the PBC download is laid out in the README.
- ``BLOODCELL_WEIGHTS``: a folder holding ImageNet weights files (``*.safetensors``, ``*.pth``).

The Makefile sets both to ``../shared/...`` by default (the project's development layout).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import BloodcellError

DATA_ENV = "BLOODCELL_DATA"
WEIGHTS_ENV = "BLOODCELL_WEIGHTS"
PBC_DOI = "10.17632/snkd93bnjr.1"
PBC_HELP = (
    f"get PBC (Acevedo et al. 2020, CC BY 4.0, doi:{PBC_DOI}) and lay it out as DIR/<class>/<image files> "
    "with the class folders basophil, eosinophil, erythroblast, ig, lymphocyte, monocyte, neutrophil, platelet; "
    f"then pass --data DIR or set {DATA_ENV}=PARENT_OF_DIR"
)


def data_root() -> Path | None:
    """The datasets folder from ``BLOODCELL_DATA``, or None."""
    value = os.environ.get(DATA_ENV)
    return Path(value) if value else None


def weights_root() -> Path | None:
    """The weights folder from ``BLOODCELL_WEIGHTS``, or None."""
    value = os.environ.get(WEIGHTS_ENV)
    return Path(value) if value else None


FIELDS_HELP = ("pass --data DIR, a boxed field set (YOLO layout: classes.txt naming white_cell, red_cell, platelet; "
               f"images/<split>/, labels/<split>/), or set {DATA_ENV}=PARENT_OF_DIR/fields")


def resolve_data(path: str | os.PathLike | None, default_name: str = "pbc224") -> Path:
    """A dataset path from a flag or a config file (``$BLOODCELL_DATA`` and ``~`` in it expanded, as the shipped
    configs write it), or ``$BLOODCELL_DATA/<default_name>``; a missing one says where to get the data."""
    help_line = FIELDS_HELP if default_name == "fields" else PBC_HELP
    if path is None:
        root = data_root()
        if root is None:
            raise BloodcellError(f"no data given: {help_line}")
        path = root / default_name
    path = Path(os.path.expanduser(os.path.expandvars(str(path))))
    if not path.exists():
        raise BloodcellError(f"{path}: no such file or folder; {help_line}")
    return path


def default_weights(model: str) -> Path | None:
    """The first file in ``$BLOODCELL_WEIGHTS`` named after a timm model (``<model>.*.safetensors`` or ``.pth``)."""
    root = weights_root()
    if root is None or not root.is_dir():
        return None
    found = sorted(p for p in root.glob(f"{model}.*") if p.suffix in (".safetensors", ".pth") and p.is_file())
    return found[0] if found else None


def resolve_weights(path: str | os.PathLike | None) -> Path | None:
    """A weights path as given; a bare file name is looked up in ``BLOODCELL_WEIGHTS``."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists() and path.parent == Path(".") and weights_root() is not None:
        candidate = weights_root() / path.name
        if candidate.exists():
            return candidate
    return path
