"""Where a dataset's splits are: the one place that knows every layout bloodcell reads.

- ``curated``: what ``bloodcell curate`` writes from class folders: ``DIR/images/{train,val,test}/<class>/``;
- ``npz-splits``: what it writes from an ``.npz``: ``DIR/{train,val,test}.npz``;
- ``split-folders``: ``DIR/{train,val[,test]}/<class>/`` made by hand;
- ``plain``: one dataset, unsplit: class folders ``DIR/<class>/`` or one ``.npz`` file.

Every command asks this module: training needs train and val, evaluation takes the test split
(or the whole of a plain dataset), export checks take the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BloodcellError
from ..core.settings import PBC_HELP
from .sources import Source, open_source

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetLayout:
    root: Path
    kind: str  # "curated", "npz-splits", "split-folders" or "plain"
    splits: dict[str, Path]  # split name -> a path open_source reads; a plain dataset has only "all"

    def path(self, *preferred: str) -> Path:
        """The first of ``preferred`` splits present, else the whole of a plain dataset."""
        for name in preferred:
            if name in self.splits:
                return self.splits[name]
        if "all" in self.splits:
            return self.splits["all"]
        raise BloodcellError(f"{self.root}: no {' or '.join(preferred)} split (found {', '.join(self.splits)})")


def find_layout(path: str | Path) -> DatasetLayout:
    """Recognise the layout of ``path``; a missing path says where to get the data."""
    root = Path(path)
    if not root.exists():
        raise BloodcellError(f"{root}: no such file or folder; {PBC_HELP}")
    if root.is_file():
        return DatasetLayout(root, "plain", {"all": root})
    candidates = (
        ("curated", {s: root / "images" / s for s in SPLITS}),
        ("npz-splits", {s: root / f"{s}.npz" for s in SPLITS}),
        ("split-folders", {s: root / s for s in SPLITS}),
    )
    for kind, paths in candidates:
        present = {s: p for s, p in paths.items() if p.exists()}
        if present:
            return DatasetLayout(root, kind, present)
    return DatasetLayout(root, "plain", {"all": root})


def training_sources(path: str | Path) -> tuple[dict[str, Source], list[str]]:
    """train and val (and test when present) of a split dataset, with the training classes."""
    layout = find_layout(path)
    if "train" not in layout.splits or "val" not in layout.splits:
        raise BloodcellError(
            f"{layout.root}: expected the output of `bloodcell curate` (images/train, images/val) or "
            f"train/ and val/ folders (or train.npz and val.npz); run `bloodcell curate {layout.root} --out DIR` first"
        )
    sources = {s: open_source(p) for s, p in layout.splits.items()}
    names = sources["train"].class_names
    for split, source in sources.items():
        if source.class_names != names and not set(source.class_names) <= set(names):
            raise BloodcellError(f"{layout.root}: classes of {split} ({source.class_names}) differ from train ({names})")
    return sources, names


def evaluation_source(path: str | Path, class_names: list[str] | None = None, skip_unknown: bool = False) -> Source:
    """What a model is scored on: the test split of a split dataset, or the whole of a plain one.

    ``class_names``: the model's classes; a class folder may name one of them another way
    ('Neutrophils', 'EOS'), and one naming none of them is refused (``skip_unknown``: left out,
    in ``Source.ignored``).
    """
    return open_source(find_layout(path).path("test"), class_names, skip_unknown=skip_unknown)


def check_source(path: str | Path) -> Source:
    """Images to check an export with: the validation split of a split dataset, or the whole of a plain one."""
    return open_source(find_layout(path).path("val"))
