"""Whole smear fields: YOLO-format box sets, the detector's letterbox, and field augmentation.

A field set is laid out as YOLO does it (the layout of ``$BLOODCELL_DATA/fields``)::

    ROOT/classes.txt                 one name per line: white_cell, red_cell, platelet
    ROOT/images/<split>/<name>.jpg
    ROOT/labels/<split>/<name>.txt   one line per box: class x_centre y_centre width height (normalised)

Also read: Ultralytics' ``data.yaml`` (``names:``) in place of ``classes.txt``, Roboflow's
``<split>/images`` and ``<split>/labels`` (``valid`` for ``val``), a set without splits
(``images/`` and ``labels/`` directly), and Pascal VOC (BCCD's layout: ``Annotations/*.xml``,
``JPEGImages/``, splits from ``ImageSets/Main/<split>.txt``). The names may be the usual ones
of each kind (``WBC``, ``RBC``, ``Platelets``, ``leukocyte``...) or white-cell types
(``neutrophil``, ``Lymphocytes``, ``EOS``...: any name
:func:`bloodcell.core.classes.canonical_class` knows). A typed box is a white cell whose type
is known: ``bloodcell evaluate`` scores the classifier on it, and ``bloodcell adapt`` learns
from it.

The detector sees a field through one path, :func:`letterbox`: the field is scaled so its
longer side is the detector's ``image_size`` and centred on a square canvas filled with the
field's own median colour. Training crops come from the same scaling, zoomed in or out, so
train and predict frame alike.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from scipy import ndimage

from ..core.classes import canonical_class, name_key
from ..core.errors import BloodcellError, ImageReadError
from .framing import locate_cell, stain_score
from .sources import IMAGE_EXTENSIONS, decode_file

KINDS = ("white_cell", "red_cell", "platelet")


# Other names field sets give the three kinds (compared as canonical_class compares them: lower case,
# letters and digits only, no plural "s"). Platelets' names are canonical_class's.
_KIND_NAMES = {
    "white_cell": ("whitecell", "wbc", "whitebloodcell", "leukocyte", "leucocyte", "leuko"),
    "red_cell": ("redcell", "rbc", "redbloodcell", "erythrocyte"),
}


@dataclass(frozen=True)
class FieldLabel:
    """What a field set's class name means: a kind, and for a white cell possibly its type (a PBC class)."""

    kind: str
    type: str | None = None


def field_label(name: str) -> FieldLabel | None:
    """A box class name as a kind (``WBC``, ``red_cell``, ``Platelets``) or a typed white cell
    (``neutrophil``, ``Lymphocytes``, ``NRBC``: erythroblasts are nucleated, found as white cells); None: unknown."""
    key = name_key(name)
    for kind, names in _KIND_NAMES.items():
        if key in names:
            return FieldLabel(kind)
    cls = canonical_class(name)
    if cls is None:
        return None
    return FieldLabel("platelet") if cls == "platelet" else FieldLabel("white_cell", cls)


@dataclass
class Boxes:
    """Boxes in pixels (x0, y0, x1, y1) with a kind index each (into :data:`KINDS`), and, where a field
    set types its white cells, a type per box (a PBC class name; "" for a box without one)."""

    xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    kinds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    types: np.ndarray | None = None
    # Boxes of classes bloodcell does not know (smudge cells, blasts...), read with ``skip_unknown``: their
    # pixel boxes and class names. Scoring leaves a detection on one of them out, as VOC does "difficult" boxes.
    ignored: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    ignored_names: tuple[str, ...] = ()
    # Each box's line in its YOLO label file (from 1; 0: a box a label fix added), where the boxes were read
    # from one: what a label fix names.
    lines: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.kinds)

    def select(self, keep: np.ndarray) -> Boxes:
        return Boxes(self.xyxy[keep], self.kinds[keep], None if self.types is None else self.types[keep],
                     self.ignored, self.ignored_names, None if self.lines is None else self.lines[keep])


@dataclass(frozen=True)
class FieldItem:
    image: Path
    labels: Path | None
    fixes: tuple[LabelFix, ...] = ()  # corrections of lines of ``labels``, applied as it is read


class LabelFix(BaseModel):
    """A correction of one line of a YOLO label file, or a box it lacks, applied when the file is read (the
    file itself is never changed). ``reads`` is the line as it must still read: a label file edited since
    the fix was written stops the run rather than taking a fix meant for another box."""

    model_config = ConfigDict(frozen=True)

    label_file: str = Field(description="the label file, relative to the field set's root (labels/train/x.txt)")
    line: int | None = Field(None, ge=1, description="the line's number in the file, from 1; none: a box the "
                             "labels left out, added after the file's own")
    reads: str | None = Field(None, description="the line as the file holds it (required with line)")
    kind: str = Field(description="the kind the box is (white_cell, red_cell, platelet), or 'none' to drop the line")
    box: tuple[float, float, float, float] | None = Field(None, description="a new box, YOLO's normalised x_centre "
                                                           "y_centre width height; default: the line's own")
    labelled: str | None = Field(None, description="the kind the line gives (a note for the reader)")
    seen: str | None = Field(None, description="what the box holds, as read by eye")

    @field_validator("kind")
    @classmethod
    def _a_kind(cls, value: str) -> str:
        if value != "none" and value not in KINDS:
            raise ValueError(f"{value!r} is not a kind ({', '.join(KINDS)}, or none to drop the line)")
        return value

    @model_validator(mode="after")
    def _a_line_or_a_new_box(self) -> LabelFix:
        if self.line is not None and self.reads is None:
            raise ValueError("a fix of a line says what the line reads (reads)")
        if self.line is None and (self.box is None or self.kind == "none"):
            raise ValueError("a box the labels left out needs its kind and its box (YOLO's x_centre y_centre width height)")
        return self


def read_label_fixes(path: str | os.PathLike, root: str | os.PathLike, only_present: bool = False) -> list[LabelFix]:
    """The fixes of a JSON file (``{"fixes": [...]}``, or a list) for the field set at ``root``; each must name
    a label file of that set (``only_present``: those that do not are left out), and no line twice."""
    path, root = Path(path), Path(root)
    try:
        raw = json.loads(path.read_text())
        entries = raw["fixes"] if isinstance(raw, dict) else raw
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise TypeError("expected a list of objects, or {\"fixes\": [...]}")
    except OSError as error:
        raise BloodcellError(f"{path}: cannot read the label fixes ({error.strerror or error})") from None
    except (ValueError, KeyError, TypeError) as error:
        raise BloodcellError(f"{path}: not a list of label fixes ({str(error).splitlines()[0]})") from None
    fixes = []
    for number, entry in enumerate(entries, 1):
        try:
            fixes.append(LabelFix(**entry))
        except ValidationError as error:
            first = error.errors()[0]
            raise BloodcellError(f"{path}: fix {number}, {'.'.join(map(str, first['loc'])) or 'entry'}: "
                                 f"{first['msg']}") from None
    if only_present:
        fixes = [fix for fix in fixes if (root / fix.label_file).is_file()]
    seen = set()
    for fix in fixes:
        if not (root / fix.label_file).is_file():
            raise BloodcellError(f"{path}: {fix.label_file} is not a label file of {root}")
        if fix.line is not None and (fix.label_file, fix.line) in seen:
            raise BloodcellError(f"{path}: {fix.label_file} line {fix.line} is fixed twice")
        seen.add((fix.label_file, fix.line))
    return fixes


def _names_file(root: Path) -> Path | None:
    for name in ("classes.txt", "data.yaml", "dataset.yaml"):
        if (root / name).is_file():
            return root / name
    return None


def _is_voc(root: Path) -> bool:
    """Pascal VOC's layout (BCCD's): ``Annotations/*.xml`` beside ``JPEGImages/``."""
    return (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir()


def _voc_objects(path: Path) -> list[tuple[str, list[float]]]:
    """(name, [x0, y0, x1, y1]) of each object of a VOC annotation; a bad file is named."""
    import xml.etree.ElementTree as ET

    try:
        tree = ET.parse(path)
        return [(obj.findtext("name", "").strip(),
                 [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
                for obj in tree.getroot().iter("object")]
    except (ET.ParseError, AttributeError, TypeError, ValueError):
        raise BloodcellError(f"{path}: not a Pascal VOC annotation (each <object> needs <name> and "
                             "<bndbox> with xmin, ymin, xmax, ymax)") from None


def _check_known(names: list[str], where: Path, skip_unknown: bool) -> list[str]:
    unknown = [n for n in names if field_label(n) is None]
    if unknown and not skip_unknown:
        raise BloodcellError(f"{where}: unknown class {unknown[0]!r}: a class is a kind ({', '.join(KINDS)}; or WBC, "
                             "RBC, Platelets...) or a white-cell type (neutrophil, lymphocyte...); --skip-unknown "
                             "leaves such boxes out")
    if unknown and len(unknown) == len(names):
        raise BloodcellError(f"{where}: none of its classes is a kind or a white-cell type ({', '.join(map(repr, names))})")
    return names


def read_kinds(root: Path, skip_unknown: bool = False) -> list[str]:
    """The class names of a field set, in label order (``classes.txt``, or ``names`` of a ``data.yaml``;
    for Pascal VOC, every object name its annotations use), each one a kind or a white-cell type
    (:func:`field_label`). A name that is neither is refused, or with ``skip_unknown`` kept, so that
    its boxes are read as ``Boxes.ignored``."""
    root = Path(root)
    if _names_file(root) is None and _is_voc(root):
        names = sorted({name for xml in sorted((root / "Annotations").glob("*.xml")) for name, _ in _voc_objects(xml)})
        return _check_known(names, root / "Annotations", skip_unknown)
    path = _names_file(root)
    if path is None:
        raise BloodcellError(f"{root}: not a field set (no classes.txt or data.yaml naming its classes: "
                             f"{', '.join(KINDS)} or white-cell types)")
    if path.suffix == ".txt":
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        try:
            names = (yaml.safe_load(path.read_text()) or {}).get("names")
        except (yaml.YAMLError, AttributeError):
            names = None
        if isinstance(names, dict):  # Ultralytics' {0: name, 1: name}
            try:
                names = [names[i] for i in sorted(names, key=int)]
            except (TypeError, ValueError):
                names = None
        if not isinstance(names, list) or not names:
            raise BloodcellError(f"{path}: no 'names:' list of the set's classes")
        names = [str(n).strip() for n in names]
    return _check_known(names, path, skip_unknown)


def split_folders(root: Path, split: str | None) -> tuple[Path, Path]:
    """(images, labels) folders of one split: ``images/<split>`` (YOLO), ``<split>/images`` (Roboflow; ``valid``
    for ``val``); without a split, or for a set without splits, ``images/`` and ``labels/`` themselves."""
    root = Path(root)
    if split:
        names = {split, {"val": "valid", "valid": "val"}.get(split, split)}
        for name in sorted(names):
            for images, labels in ((root / "images" / name, root / "labels" / name),
                                   (root / name / "images", root / name / "labels")):
                if images.is_dir():
                    return images, labels
    flat = root / "images"
    if flat.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in flat.iterdir()):
        return flat, root / "labels"
    if split:
        raise BloodcellError(f"{root}: no {split} split (looked for images/{split}/ and {split}/images/)")
    raise BloodcellError(f"{root}: no images/ folder of fields")


def field_splits(root: Path) -> list[str]:
    """The splits a field set has (``train``, ``val``, ``test``...), or [] for a set without splits."""
    root = Path(root)
    found = set()
    if (root / "images").is_dir():
        found |= {p.name for p in (root / "images").iterdir() if p.is_dir()}
    found |= {p.name for p in root.iterdir() if p.is_dir() and (p / "images").is_dir()}
    return sorted(found)


def is_field_set(root: Path) -> bool:
    """Whether ``root`` is a set of boxed fields (class names and an images folder), not class folders of images."""
    root = Path(root)
    if not root.is_dir():
        return False
    if _is_voc(root):
        return True
    pairs = [root, *(root / s for s in ("train", "val", "valid", "test"))]
    return _names_file(root) is not None and any((p / "images").is_dir() and (p / "labels").is_dir() for p in pairs)


def open_fields(root: str | os.PathLike, split: str | None, fixes: list[LabelFix] | None = None) -> list[FieldItem]:
    """The fields of one split (None: a set without splits, or every split), each with its label file
    (None where a field has none: no cells) and the ``fixes`` of that file (:func:`read_label_fixes`)."""
    root = Path(root)
    read_kinds(root, skip_unknown=True)  # a field set at all; its callers read its names as they need them
    if _names_file(root) is None and _is_voc(root):
        if fixes:
            raise BloodcellError(f"{root}: label fixes name lines of YOLO label files; this set is Pascal VOC's")
        return _voc_fields(root, split)
    if split is None and field_splits(root):
        return [item for name in field_splits(root) for item in open_fields(root, name, fixes)]
    by_file: dict[Path, list[LabelFix]] = {}
    for fix in fixes or []:
        by_file.setdefault((root / fix.label_file).resolve(), []).append(fix)
    images, labels = split_folders(root, split)
    items = []
    for path in sorted(images.iterdir()):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            label = labels / f"{path.stem}.txt"
            items.append(FieldItem(path, label if label.is_file() else None,
                                   tuple(by_file.get(label.resolve(), ())) if by_file and label.is_file() else ()))
    if not items:
        raise BloodcellError(f"{images}: no images")
    return items


def _voc_fields(root: Path, split: str | None) -> list[FieldItem]:
    """A VOC set's fields: those ``ImageSets/Main/<split>.txt`` lists, or every image of ``JPEGImages``."""
    images = sorted(p for p in (root / "JPEGImages").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if split:
        listed = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listed.is_file():
            raise BloodcellError(f"{root}: no {split} split (no ImageSets/Main/{split}.txt)")
        wanted = {line.split()[0] for line in listed.read_text().splitlines() if line.strip()}
        images = [p for p in images if p.stem in wanted]
    if not images:
        raise BloodcellError(f"{root / 'JPEGImages'}: no images{f' in the {split} split' if split else ''}")
    return [FieldItem(p, (root / "Annotations" / f"{p.stem}.xml") if (root / "Annotations" / f"{p.stem}.xml").is_file()
                      else None) for p in images]


def read_boxes(item: FieldItem, width: int, height: int, kind_names: list[str], skip_unknown: bool = False) -> Boxes:
    """A label file (YOLO's, or a Pascal VOC annotation) as pixel boxes, typed where the set's class names
    are white-cell types; a bad line names the file and the line. A box of a class that is neither a
    kind nor a white-cell type is refused, or with ``skip_unknown`` kept apart in ``Boxes.ignored``."""
    if item.labels is None:
        return Boxes()
    labels = [field_label(name) for name in kind_names]
    if item.labels.suffix == ".xml":  # Pascal VOC: pixel corners, a name per object
        entries = [(name, field_label(name), box, 0) for name, box in _voc_objects(item.labels)]
        labels = [label for _, label, _, _ in entries]
    else:
        entries = _yolo_entries(item, width, height, kind_names, labels)
    unknown = [(name, box) for name, label, box, _ in entries if label is None]
    if unknown and not skip_unknown:
        raise BloodcellError(f"{item.labels}: unknown class {unknown[0][0]!r} (--skip-unknown leaves such boxes out)")
    known = [(label, box, line) for _, label, box, line in entries if label is not None]
    typed = any(label.type for label in labels if label is not None)
    ignored = np.asarray([box for _, box in unknown], np.float32).reshape(-1, 4)
    names = tuple(name for name, _ in unknown)
    if not known:
        return Boxes(ignored=ignored, ignored_names=names)
    return Boxes(np.asarray([box for _, box, _ in known], np.float32),
                 np.asarray([KINDS.index(label.kind) for label, _, _ in known], np.int64),
                 np.asarray([label.type or "" for label, _, _ in known]) if typed else None, ignored, names,
                 None if item.labels.suffix == ".xml" else np.asarray([line for _, _, line in known], np.int64))


def _yolo_entries(item: FieldItem, width: int, height: int, kind_names: list[str],
                  labels: list[FieldLabel | None]) -> list[tuple[str, FieldLabel | None, list[float], int]]:
    """(class name, label (None: unknown), pixel box, line number) of each line of a YOLO label file, read
    through the item's fixes; a bad line names the file and the line."""
    entries = []
    lines = item.labels.read_text().splitlines()
    fixes = {fix.line: fix for fix in item.fixes if fix.line is not None}
    for number, line in enumerate(lines, 1):
        fix = fixes.pop(number, None)
        if fix is not None:
            if line.strip() != fix.reads.strip():
                raise BloodcellError(f"{item.labels}:{number}: reads {line.strip()!r}, not {fix.reads!r} as its label fix "
                                     "says: the file changed since the fix was written")
            if fix.kind == "none":
                continue
            box = fix.box or tuple(map(float, line.split()[1:5]))
            entries.append((fix.kind, field_label(fix.kind), _pixel_box(*box, width, height), number))
            continue
        parts = line.split()
        if not parts:
            continue
        try:
            index, cx, cy, w, h = int(parts[0]), *map(float, parts[1:5])
        except (ValueError, TypeError):
            raise BloodcellError(f"{item.labels}:{number}: expected 'class x_centre y_centre width height'") from None
        if not 0 <= index < len(kind_names):
            raise BloodcellError(f"{item.labels}:{number}: class {index} is not in the set's {len(kind_names)} class names")
        entries.append((kind_names[index], labels[index], _pixel_box(cx, cy, w, h, width, height), number))
    if fixes:
        raise BloodcellError(f"{item.labels}: has {len(lines)} lines; its label fix names line {min(fixes)}")
    for fix in item.fixes:
        if fix.line is None:  # a box the labels left out; line 0: in no line of the file
            entries.append((fix.kind, field_label(fix.kind), _pixel_box(*fix.box, width, height), 0))
    return entries


def _pixel_box(cx: float, cy: float, w: float, h: float, width: int, height: int) -> list[float]:
    """YOLO's normalised centre and size as pixel corners (x0, y0, x1, y1)."""
    return [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]


def load_field(item: FieldItem, kind_names: list[str], skip_unknown: bool = False) -> tuple[np.ndarray, Boxes]:
    image, _ = decode_file(item.image)
    return image, read_boxes(item, image.shape[1], image.shape[0], kind_names, skip_unknown)


def fill_colour(image: np.ndarray) -> np.ndarray:
    """The colour a field's canvas is padded with: its median pixel (the smear's background, mostly)."""
    return np.median(image[::4, ::4].reshape(-1, 3), axis=0).astype(np.uint8)


# A photo taken through the eyepiece shows the smear in a bright disc, in a dark surround: pixels
# darker than SURROUND_DARK of the field's bright level (its 90th percentile), joined to the
# photo's edge, over at least SURROUND_MIN_SHARE of it. A stained nucleus is 0.4-0.6 of that level.
SURROUND_DARK = 0.25
SURROUND_MIN_SHARE = 0.02


def field_of_view(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """Where a photo shows the smear, when it shows it inside a dark surround (an eyepiece's round
    aperture, a black border): the image with the surround painted in the smear's background colour, and
    the box (x0, y0, x1, y1) around what is left. None where the photo has no dark surround, or is
    dark nearly all over (then there is nothing to tell apart).

    The detector would otherwise read the dark as red cells and platelets, and measure the field's
    magnification on them (docs/fields.md, "How a field is read", step 0).
    """
    height, width = image.shape[:2]
    # First, cheaply: a surround touches the photo's edge, so a photo whose edge holds no dark pixel has none.
    every = max(1, math.ceil(max(height, width) / 128))
    glance = image[::every, ::every].max(axis=2)
    rank = int(0.9 * (glance.size - 1))
    bright = np.partition(glance.ravel(), rank)[rank]
    if not (np.concatenate([glance[0], glance[-1], glance[:, 0], glance[:, -1]]) < SURROUND_DARK * bright).any():
        return None
    step = max(1, round(max(height, width) / 256))
    small = ndimage.uniform_filter(image[::step, ::step].max(axis=2).astype(np.float32), 3)
    dark = small < SURROUND_DARK * np.percentile(small, 90)
    if dark.mean() < SURROUND_MIN_SHARE:
        return None
    labels, _ = ndimage.label(dark)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    surround = np.isin(labels, edge[edge > 0])
    if surround.mean() < SURROUND_MIN_SHARE or surround.mean() > 0.9:
        return None
    surround = ndimage.binary_dilation(surround, iterations=2)  # the aperture's dim rim
    rows, cols = np.nonzero(~surround)
    box = (int(cols.min()) * step, int(rows.min()) * step, min(width, (int(cols.max()) + 1) * step),
           min(height, (int(rows.max()) + 1) * step))
    # the smear's background: the median of its brightest quarter (at a high magnification the cells cover
    # most of the aperture, and the median of all of it is a cell's colour, whose edge reads as cells)
    smear = image[::step, ::step][~surround].astype(np.float32)
    light = smear.sum(axis=1)
    colour = np.median(smear[light >= np.percentile(light, 75)], axis=0)
    # the surround at full size: each small pixel stands for a step x step block (the grid covers the photo)
    mask = np.asarray(Image.fromarray(surround).resize((surround.shape[1] * step, surround.shape[0] * step),
                                                      Image.Resampling.NEAREST))[:height, :width]
    filled = image.copy()
    filled[mask] = colour.astype(np.uint8)
    return filled, box


@dataclass(frozen=True)
class Letterbox:
    scale: float  # canvas pixels per original pixel
    left: float
    top: float

    def to_original(self, xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
        out = (np.asarray(xyxy, np.float32) - [self.left, self.top, self.left, self.top]) / self.scale
        return np.clip(out, 0, [width, height, width, height]).astype(np.float32)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """The field scaled so its longer side is ``size``, centred on a size x size canvas of its median colour."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = fill_colour(image)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas, Letterbox(new_w / width, left, top)


# ---------------------------------------------------------------------------------------------
# Training samples
# ---------------------------------------------------------------------------------------------


@dataclass
class PastePatch:
    """A platelet cut out of a PBC crop: RGB, a soft alpha mask, the stained blob's box in the patch, and the
    blob's side relative to a red cell's side in its own image (PBC's magnification: :data:`PBC_RED_CELL_SHARE`)."""

    rgb: np.ndarray
    alpha: np.ndarray
    blob: tuple[float, float, float, float]
    relative: float


# A red cell's side as a share of a PBC image's side: the shipped detector's red-cell boxes on 150 of
# PBC's platelet images (224 px) have a median side of 52.5 px (10th-90th percentile 48-57).
PBC_RED_CELL_SHARE = 52.5 / 224
# Pasted platelets' side as a share of the field's red cells: the Raabin fields' 28 labelled platelets
# are 0.28-0.91 of their field's median red-cell side (median 0.40).
PASTED_SIDE = (0.2, 0.45)


def platelet_patches(paths: list[Path], limit: int = 400, seed: int = 0) -> list[PastePatch]:
    """Platelets cut from PBC's platelet crops (the stained blob at the centre, with a soft edge).

    The fields hold only a few platelets; pasting these into training fields (copy-paste
    augmentation, Ghiasi et al. 2021) gives the detector many more.
    """
    rng = np.random.default_rng(seed)
    chosen = [paths[i] for i in rng.permutation(len(paths))[:limit]]
    patches = []
    for path in chosen:
        try:
            image, _ = decode_file(path)
        except ImageReadError:
            continue
        found = locate_cell(image)
        if found is None:
            continue
        height, width = image.shape[:2]
        score = ndimage.uniform_filter(stain_score(image), size=5)
        low, high = np.percentile(score, [50, 99.5])
        mask = score > low + 0.45 * (high - low)
        labels, _ = ndimage.label(mask)
        centre = labels[int(found.cy * height), int(found.cx * width)]
        if centre == 0:
            ys, xs = np.nonzero(labels)
            if len(ys) == 0:
                continue
            nearest = np.argmin((ys - found.cy * height) ** 2 + (xs - found.cx * width) ** 2)
            centre = labels[ys[nearest], xs[nearest]]
        blob = labels == centre
        ys, xs = np.nonzero(blob)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        side = max(y1 - y0, x1 - x0)
        if side < 6 or side > 0.5 * min(height, width):
            continue  # a speck, or a clump too large to be one platelet
        pad = math.ceil(0.25 * side) + 2
        py0, px0 = max(0, y0 - pad), max(0, x0 - pad)
        py1, px1 = min(height, y1 + pad), min(width, x1 + pad)
        alpha = ndimage.gaussian_filter(ndimage.binary_dilation(blob, iterations=2).astype(np.float32), 1.5)
        patches.append(PastePatch(image[py0:py1, px0:px1].copy(), alpha[py0:py1, px0:px1],
                                  (float(x0 - px0), float(y0 - py0), float(x1 - px0), float(y1 - py0)),
                                  side / (PBC_RED_CELL_SHARE * min(height, width))))
    return patches


def box_overlap(a: np.ndarray, b: np.ndarray, over: str = "union") -> np.ndarray:
    """Pairwise overlap of (n, 4) and (m, 4) xyxy boxes: intersection over their union (IoU), over the
    smaller box (``"smaller"``), or over each box of ``a`` (``"first"``)."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    if over == "union":
        base = area_a + area_b - inter
    elif over == "smaller":
        base = np.minimum(area_a, area_b)
    elif over == "first":
        base = np.broadcast_to(area_a, inter.shape)
    else:
        raise ValueError(f"over must be 'union', 'smaller' or 'first', got {over!r}")
    return inter / np.maximum(base, 1e-9)


def paste_platelets(image: np.ndarray, boxes: Boxes, patches: list[PastePatch], count: int,
                    rng: np.random.Generator, own_size_p: float = 0.0) -> tuple[np.ndarray, Boxes]:
    """Paste ``count`` platelets where no cell is, sized against the field's red cells: a side of
    :data:`PASTED_SIDE` of theirs, or, with probability ``own_size_p``, the platelet's own size against
    its own image's red cells (PBC's platelet images hold giant platelets as large as a red cell)."""
    if not patches or count == 0:
        return image, boxes
    red = boxes.xyxy[boxes.kinds == KINDS.index("red_cell")]
    red_side = float(np.median(np.maximum(red[:, 2] - red[:, 0], red[:, 3] - red[:, 1]))) if len(red) else 0.2 * min(image.shape[:2])
    image = image.copy()
    xyxy, kinds = list(boxes.xyxy), list(boxes.kinds)
    height, width = image.shape[:2]
    for _ in range(count):
        patch = patches[rng.integers(len(patches))]
        bx0, by0, bx1, by1 = patch.blob
        share = (min(patch.relative, 1.0) * rng.uniform(0.9, 1.1) if own_size_p and rng.random() < own_size_p
                 else rng.uniform(*PASTED_SIDE))
        scale = red_side * share / max(bx1 - bx0, by1 - by0)
        ph, pw = patch.rgb.shape[:2]
        new_w, new_h = max(2, round(pw * scale)), max(2, round(ph * scale))
        if new_w >= width or new_h >= height:
            continue
        for _attempt in range(10):
            left, top = int(rng.integers(0, width - new_w)), int(rng.integers(0, height - new_h))
            box = np.array([left + bx0 * scale, top + by0 * scale, left + bx1 * scale, top + by1 * scale], np.float32)
            others = np.asarray(xyxy, np.float32).reshape(-1, 4)
            if not len(others) or box_overlap(box[None], others, "first").max() < 0.05:
                break
        else:
            continue
        rgb = np.asarray(Image.fromarray(patch.rgb).resize((new_w, new_h), Image.Resampling.BILINEAR), np.float32)
        alpha = np.asarray(Image.fromarray(patch.alpha).resize((new_w, new_h), Image.Resampling.BILINEAR))[..., None]
        region = image[top : top + new_h, left : left + new_w].astype(np.float32)
        image[top : top + new_h, left : left + new_w] = np.clip(alpha * rgb + (1 - alpha) * region, 0, 255).astype(np.uint8)
        xyxy.append(box)
        kinds.append(KINDS.index("platelet"))
    return image, Boxes(np.asarray(xyxy, np.float32).reshape(-1, 4), np.asarray(kinds, np.int64))


def scaled(image: np.ndarray, boxes: Boxes, scale: float) -> tuple[np.ndarray, Boxes]:
    height, width = image.shape[:2]
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    return image, Boxes(boxes.xyxy * np.array([new_w / width, new_h / height] * 2, np.float32), boxes.kinds)


def clip_boxes(boxes: Boxes, left: float, top: float, width: int, height: int, min_visible: float | np.ndarray = 0.35,
               min_side: float = 3.0) -> Boxes:
    """Boxes moved into a crop's frame; cells mostly outside the crop are dropped.

    ``min_visible``: the share of a cell that must be inside to keep its box, one for every kind
    or one per kind (indexed by the boxes' kinds).
    """
    if np.ndim(min_visible):
        min_visible = np.asarray(min_visible, np.float32)[boxes.kinds]
    xyxy = boxes.xyxy - np.array([left, top, left, top], np.float32)
    clipped = np.clip(xyxy, 0, [width, height, width, height]).astype(np.float32)
    area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    kept = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (kept >= min_visible * np.maximum(area, 1e-6)) & (clipped[:, 2] - clipped[:, 0] >= min_side) & (
        clipped[:, 3] - clipped[:, 1] >= min_side)
    return Boxes(clipped[keep], boxes.kinds[keep])


def mosaic(fields: list[tuple[np.ndarray, Boxes]], size: int, crop: int, zoom: float,
           rng: np.random.Generator, min_visible: float | np.ndarray = 0.35) -> tuple[np.ndarray, Boxes]:
    """A crop x crop training sample at ``zoom`` times the letterbox scale of ``size``.

    Zoomed in, one field is cropped; zoomed out, fields are tiled side by side until the crop
    is full, so small cells come with a full frame of neighbours rather than empty canvas.
    A cell cut by a tile's or the crop's edge keeps its box when ``min_visible`` of it is inside.
    """
    first = fields[0][0]
    tiles = []
    for image, boxes in fields:
        tiles.append(scaled(image, boxes, zoom * size / max(image.shape[:2])))
    tile_h, tile_w = tiles[0][0].shape[:2]
    rows, cols = max(1, math.ceil(crop / tile_h)), max(1, math.ceil(crop / tile_w))
    canvas_h, canvas_w = max(crop, rows * tile_h), max(crop, cols * tile_w)
    canvas = np.empty((canvas_h, canvas_w, 3), np.uint8)
    canvas[:] = fill_colour(first)
    xyxy, kinds = [], []
    for index in range(rows * cols):
        image, boxes = tiles[index % len(tiles)]
        r, c = divmod(index, cols)
        h, w = min(image.shape[0], canvas_h - r * tile_h), min(image.shape[1], canvas_w - c * tile_w)
        canvas[r * tile_h : r * tile_h + h, c * tile_w : c * tile_w + w] = image[:h, :w]
        placed = clip_boxes(boxes, -c * tile_w, -r * tile_h, c * tile_w + w, r * tile_h + h, min_visible)
        placed = clip_boxes(placed, c * tile_w, r * tile_h, w, h, min_visible)
        xyxy.append(placed.xyxy + np.array([c * tile_w, r * tile_h] * 2, np.float32))
        kinds.append(placed.kinds)
    top, left = int(rng.integers(0, canvas_h - crop + 1)), int(rng.integers(0, canvas_w - crop + 1))
    out = canvas[top : top + crop, left : left + crop]
    boxes = clip_boxes(Boxes(np.concatenate(xyxy), np.concatenate(kinds)), left, top, crop, crop, min_visible)
    return np.ascontiguousarray(out), boxes


def flip_rotate(image: np.ndarray, boxes: Boxes, rng: np.random.Generator) -> tuple[np.ndarray, Boxes]:
    """A random one of the 8 flips and quarter turns (a smear has no up or left)."""
    size = image.shape[0]
    xyxy = boxes.xyxy.copy()
    if rng.random() < 0.5:
        image = image[:, ::-1]
        xyxy[:, [0, 2]] = size - xyxy[:, [2, 0]]
    for _ in range(rng.integers(4)):
        image = np.rot90(image)  # counter-clockwise: (x, y) -> (y, size - x)
        xyxy = np.stack([xyxy[:, 1], size - xyxy[:, 2], xyxy[:, 3], size - xyxy[:, 0]], axis=1)
    return np.ascontiguousarray(image), Boxes(xyxy.astype(np.float32), boxes.kinds)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Other labs' stains, lamps and cameras: per-channel gain and offset, saturation, gamma, blur, noise."""
    x = image.astype(np.float32) / 255.0
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - 0.5 * strength, 1 + 0.5 * strength)  # saturation
    x = x * rng.uniform(1 - 0.15 * strength, 1 + 0.15 * strength, 3) + rng.uniform(-0.08, 0.08, 3) * strength
    x = np.clip(x, 0, 1) ** rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength)
    if rng.random() < 0.3:
        x = ndimage.gaussian_filter(x, sigma=(rng.uniform(0.5, 1.5),) * 2 + (0,))
    if rng.random() < 0.3:
        x = x + rng.normal(0, rng.uniform(0.005, 0.03), x.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def blank_sample(fields: list[tuple[np.ndarray, Boxes]], crop: int, rng: np.random.Generator) -> tuple[np.ndarray, Boxes]:
    """A field with no cell in it: a smear's background colour, uneven light, blur and noise; no boxes.

    Without such samples the detector calls an empty or uniform field one whole-frame white cell.
    """
    colour = fill_colour(fields[0][0]).astype(np.float32) * rng.uniform(0.8, 1.1, 3)
    yy, xx = np.mgrid[0:crop, 0:crop] / crop
    light = 1 + rng.uniform(-0.15, 0.15) * (xx - 0.5) + rng.uniform(-0.15, 0.15) * (yy - 0.5)
    image = colour[None, None, :] * light[..., None] + rng.normal(0, rng.uniform(1, 8), (crop, crop, 3))
    return np.clip(image, 0, 255).astype(np.uint8), Boxes()


def training_sample(fields: list[tuple[np.ndarray, Boxes]], size: int, crop: int, rng: np.random.Generator,
                    patches: list[PastePatch] | None = None, zoom: tuple[float, float] = (0.3, 1.5),
                    platelets: tuple[int, int] = (0, 4), blank_p: float = 0.0,
                    min_visible: float | np.ndarray = 0.35, own_size_p: float = 0.0) -> tuple[np.ndarray, Boxes]:
    """One augmented crop: pasted platelets, zoom (log-uniform), tiling, flips, turns and colour; or, with
    probability ``blank_p``, an empty field."""
    if blank_p and rng.random() < blank_p:
        image, boxes = blank_sample(fields, crop, rng)
        return colour_jitter(image, rng), boxes
    pasted = []
    for image, boxes in fields:
        if patches:
            image, boxes = paste_platelets(image, boxes, patches, int(rng.integers(platelets[0], platelets[1] + 1)), rng,
                                           own_size_p)
        pasted.append((image, boxes))
    z = float(np.exp(rng.uniform(np.log(zoom[0]), np.log(zoom[1]))))
    image, boxes = mosaic(pasted, size, crop, z, rng, min_visible)
    image, boxes = flip_rotate(image, boxes, rng)
    return colour_jitter(image, rng), boxes
