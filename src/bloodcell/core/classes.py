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
# The folder of cells sorted for review (`predict --sort-into`, `count --crops`) that a person still has to
# check; `adapt --data` leaves it out.
TO_CHECK_FOLDER = "to_check"

# Other names labs give the same classes (folder names are compared after `name_key`: lower case,
# no spaces, hyphens or underscores, no plural "s"). PBC's neutrophil class holds band and
# segmented neutrophils, its ig class promyelocytes, myelocytes and metamyelocytes.
_ALIASES: dict[str, tuple[str, ...]] = {
    "basophil": ("baso", "bas"),
    "eosinophil": ("eos", "eo", "eosino"),
    "erythroblast": ("nrbc", "nucleatedredbloodcell", "nucleatedrbc", "normoblast"),
    "ig": ("immaturegranulocyte", "promyelocyte", "myelocyte", "metamyelocyte"),
    "lymphocyte": ("lymph", "lym"),
    "monocyte": ("mono", "mon"),
    "neutrophil": ("neut", "neu", "neutro", "segmentedneutrophil", "bandneutrophil", "band", "segmented", "seg"),
    "platelet": ("plt", "thrombocyte", "giantplatelet"),
}


def name_key(name: str) -> str:
    """How class names are compared: lower case, letters and digits only, no plural "s"."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    return key[:-1] if key.endswith("s") and len(key) > 3 else key


_BY_KEY = {name_key(alias): name for name, aliases in _ALIASES.items() for alias in (name, *aliases)}


def canonical_class(name: str) -> str | None:
    """The PBC class a class-folder name means ('Neutrophils', 'EOS', 'immature granulocytes'), or None."""
    return name if name in CLASS_NAMES else _BY_KEY.get(name_key(name))
