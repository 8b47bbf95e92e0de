"""The PBC dataset's eight classes (Acevedo et al. 2020), in label order."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)
# The classes a white-cell differential counts (erythroblasts and platelets are reported apart).
WHITE_CELLS: tuple[str, ...] = ("basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil")
