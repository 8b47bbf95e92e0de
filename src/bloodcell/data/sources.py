"""Reading blood-cell datasets: class folders, course-style and MedMNIST-style ``.npz``.

Every reader produces a :class:`Source`: a list of :class:`Item` (position in
the input, a path a person can find, a label) plus the class names.  Pixels are
decoded lazily by :func:`iter_batches`, so a million-image folder is never held
in memory at once.  Whatever the file holds (palette, grayscale, 16-bit, CMYK,
RGBA, EXIF-rotated), the decoded image is RGB uint8 H x W x 3; what had to be
converted is counted, and items that cannot be used are reported with a reason
instead of stopping the run.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.classes import CLASS_NAMES, canonical_class
from ..core.errors import BloodcellError, ImageReadError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
# Refuse images over this many pixels before decoding them (decompression bombs);
# analyser crops are about 0.13 Mpx, whole-slide tiles rarely above 50 Mpx.
DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class Item:
    index: int  # position in the input, stable across runs
    path: str  # a file path, or "file.npz::array[i]" for array data
    label: int | None


@dataclass
class Source:
    """A dataset as read from disk: what it is, its items and their class names."""

    root: Path
    kind: str  # "folders", "npz" or "medmnist"
    class_names: list[str]
    items: list[Item]
    # (index, path, reason) for items refused while reading the layout.
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    # For npz sources: the image arrays keyed by the array name in Item.path.
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # Class folders read under another name: folder name -> class ('Neutrophils' -> 'neutrophil').
    renamed: dict[str, str] = field(default_factory=dict)
    # Folders left out on purpose (``open_source(..., ignore=...)``, or of classes unknown with
    # ``skip_unknown``): folder name -> files in it.
    ignored: dict[str, int] = field(default_factory=dict)

    def label_name(self, label: int | None) -> str:
        return "" if label is None else self.class_names[label]


def renamed_line(renamed: dict[str, str]) -> str | None:
    """'read class folder(s) Neutrophils as neutrophil, EOS as eosinophil', or None when nothing was renamed."""
    if not renamed:
        return None
    return "read class folder(s) " + ", ".join(f"{folder} as {name}" for folder, name in renamed.items())


@dataclass
class Batch:
    items: list[Item]
    images: list[np.ndarray]  # RGB uint8 (H, W, 3), aligned with items
    failed: list[tuple[Item, str]]  # items that could not be decoded, with the reason
    conversions: Counter  # "mode P converted to RGB" -> count


def open_source(path: str | os.PathLike, class_names: list[str] | None = None, ignore: tuple[str, ...] = (),
                skip_unknown: bool = False) -> Source:
    """Read a dataset's layout (not its pixels) from a class-folder tree or an ``.npz`` file.

    Folders named in ``ignore`` (``count --crops``'s ``to_check``) are left out and counted in ``Source.ignored``.
    A folder naming none of ``class_names`` is refused, or with ``skip_unknown`` left out and counted there too
    (a lab's set often holds classes a model does not know: smudge cells, blasts, artefacts)."""
    root = Path(path)
    if not root.exists():
        raise BloodcellError(f"{root}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() != ".npz":
            raise BloodcellError(f"{root}: expected a folder of class folders or an .npz file")
        return _open_npz(root, class_names)
    return _open_folders(root, class_names, ignore, skip_unknown)


def _open_folders(root: Path, class_names: list[str] | None, ignore: tuple[str, ...] = (),
                  skip_unknown: bool = False) -> Source:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    def files_in(folder: Path) -> int:  # what a folder left out held, to say so
        return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))

    ignored = {d.name: files_in(d) for d in subdirs if d.name in ignore}
    subdirs = [d for d in subdirs if d.name not in ignore]
    if not subdirs:
        raise BloodcellError(
            f"{root}: no class folders found; expected {root}/<class>/<image files>"
        )
    found = [d.name for d in subdirs]
    if class_names is None:
        # Keep the PBC label order when the folders are PBC classes, so that label
        # ids mean the same thing across datasets; otherwise sort the names.
        class_names = [c for c in CLASS_NAMES if c in found] if set(found) <= set(CLASS_NAMES) else found
        folder_class = {name: name for name in found}  # a dataset's own classes: its folders, as named
    else:
        # A model's classes: a lab's folder may name one of them another way ('Neutrophils', 'EOS').
        folder_class = {name: name if name in class_names else canonical_class(name) for name in found}
    unknown = [name for name, cls in folder_class.items() if cls not in class_names]
    if unknown and not skip_unknown:
        raise BloodcellError(
            f"{root}: unknown class folder(s) {', '.join(unknown)}; known classes: {', '.join(class_names)} "
            "(--skip-unknown leaves them out)"
        )
    for name in unknown:
        ignored[name] = files_in(root / name)
        found.remove(name)
    if not found:
        raise BloodcellError(f"{root}: none of its class folders names one of the classes {', '.join(class_names)}")
    items: list[Item] = []
    problems: list[tuple[int, str, str]] = []
    for label, name in enumerate(class_names):
        for folder in (root / f for f in found if folder_class[f] == name):
            for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                if file.name.startswith("."):
                    continue
                if file.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append(Item(len(items) + len(problems), str(file), label))
                else:
                    problems.append((len(items) + len(problems), str(file), "not an image file extension"))
    for file in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        problems.append((len(items) + len(problems), str(file), "not inside a class folder"))
    renamed = {name: folder_class[name] for name in found if name != folder_class[name]}
    return Source(root, "folders", list(class_names), items, problems, renamed=renamed, ignored=ignored)


def _npz_labels(labels: np.ndarray, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dtype == object:
        raise BloodcellError(f"{where}: labels are Python objects; save an integer array of shape (N,)")
    if labels.ndim != 1:
        raise BloodcellError(f"{where}: labels must have shape (N,) or (N, 1), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise BloodcellError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def _npz_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype == object:
        raise BloodcellError(f"{where}: images are Python objects, not pixels; save a uint8 array of shape (N, H, W, 3)")
    if images.ndim not in (3, 4):
        raise BloodcellError(
            f"{where}: images must be an array of shape (N, H, W, 3) (or (N, H, W) grayscale), got {images.shape}"
        )
    if images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
        raise BloodcellError(f"{where}: images must have 1, 3 or 4 channels in the last axis, got {images.shape}")
    if np.issubdtype(images.dtype, np.floating):
        raise BloodcellError(
            f"{where}: images are {images.dtype}, expected uint8 pixels 0-255; "
            "convert them first, e.g. (images * 255).round().astype('uint8') for values in 0-1"
        )
    if not np.issubdtype(images.dtype, np.integer):
        raise BloodcellError(f"{where}: images must be uint8, got dtype {images.dtype}")
    return images


def _npz_array(data, key: str, root: Path) -> np.ndarray:
    """One array of an open .npz; a pickled or unreadable one is a one-line error naming the file."""
    try:
        return data[key]
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise BloodcellError(f"{root}::{key}: holds pickled Python objects, which bloodcell never loads; "
                                 "save plain numeric arrays (np.savez with uint8 images and integer labels)") from None
        raise BloodcellError(f"{root}::{key}: unreadable array ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib, OSError: a damaged member
        raise BloodcellError(f"{root}::{key}: unreadable array ({type(exc).__name__}: {exc})") from None


def _open_npz(root: Path, class_names: list[str] | None) -> Source:
    try:
        data = np.load(root, allow_pickle=False)
        keys = set(data.files)
    except Exception as exc:  # noqa: BLE001 - zipfile, ValueError, OSError: a broken or non-npz file
        reason = "not a zip archive" if "zip" in str(exc).lower() or "pickle" in str(exc).lower() else str(exc)
        raise BloodcellError(f"{root}: not a readable .npz file ({reason})") from None
    stored_names = None
    for key in ("class_names", "classes", "label_names"):
        if key in keys:
            stored_names = [str(x) for x in _npz_array(data, key, root).tolist()]
    names = list(class_names or stored_names or CLASS_NAMES)
    if {"images", "labels"} <= keys:
        parts = [("images", "labels")]
        kind = "npz"
    else:
        parts = [(f"{s}_images", f"{s}_labels") for s in ("train", "val", "test") if f"{s}_images" in keys]
        kind = "medmnist"
        if not parts:
            raise BloodcellError(
                f"{root}: expected arrays 'images' and 'labels' (or MedMNIST's 'train_images', "
                f"'train_labels', ...), found {', '.join(sorted(keys)) or 'none'}"
            )
    items: list[Item] = []
    problems: list[tuple[int, str, str]] = []
    arrays: dict[str, np.ndarray] = {}
    for image_key, label_key in parts:
        where = f"{root}::{image_key}"
        if label_key not in keys:
            raise BloodcellError(f"{root}: '{image_key}' has no matching '{label_key}' array")
        images = _npz_images(_npz_array(data, image_key, root), where)
        labels = _npz_labels(_npz_array(data, label_key, root), f"{root}::{label_key}")
        if len(labels) != len(images):
            raise BloodcellError(
                f"{root}: {len(images)} images in '{image_key}' but {len(labels)} labels in '{label_key}'"
            )
        arrays[image_key] = images
        for i, label in enumerate(labels.tolist()):
            index = len(items) + len(problems)
            path = f"{root}::{image_key}[{i}]"
            if 0 <= label < len(names):
                items.append(Item(index, path, label))
            else:
                problems.append((index, path, f"label {label} out of range 0..{len(names) - 1}"))
    return Source(root, kind, names, items, problems, arrays)


def _to_rgb_uint8(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Bring a decoded array to RGB uint8; say what was converted, if anything."""
    note = None
    if image.dtype != np.uint8:
        note = f"dtype {image.dtype} scaled to uint8"
        values = image.astype(np.float64)
        top = float(np.nanmax(values)) if values.size else 0.0
        if np.issubdtype(image.dtype, np.floating) and top <= 1.0:
            values = values * 255.0
        elif top > 255.0:
            values = values / (65535.0 if top <= 65535.0 else top) * 255.0
        image = np.clip(np.nan_to_num(np.round(values)), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
        note = note or "grayscale converted to RGB"
    elif image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
        note = note or "grayscale converted to RGB"
    elif image.shape[2] == 4:
        image = image[:, :, :3]
        note = note or "alpha channel dropped"
    return np.ascontiguousarray(image), note


def decode_file(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """Decode one image file to RGB uint8, honouring EXIF orientation.

    Returns (image, conversion note or None).  Raises :class:`ImageReadError`
    with a reason a person understands.
    """
    return decode_stream(Path(path), max_pixels)


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """Decode an image held in memory (an upload), with the same checks as files."""
    return decode_stream(data, max_pixels)


def decode_stream(stream, max_pixels: int) -> tuple[np.ndarray, str | None]:
    """Decode a path, an open file or bytes to RGB uint8 (see :func:`decode_pil`)."""
    image, note = decode_pil(stream, max_pixels)
    return (np.asarray(image) if isinstance(image, Image.Image) else image), note


def decode_pil(stream, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image | np.ndarray, str | None]:
    """Decode to an RGB Pillow image (or an RGB uint8 array for 16-bit and float images), EXIF-oriented.

    The cheap form for preprocessing (:func:`bloodcell.data.preprocess_batch` takes either):
    no copy to NumPy and back. Raises :class:`ImageReadError` with a reason a person understands.
    """
    if isinstance(stream, (str, os.PathLike)):
        try:
            if Path(stream).stat().st_size == 0:
                raise ImageReadError("empty file (0 bytes)")
        except OSError as exc:
            raise ImageReadError(f"cannot read ({exc.strerror})") from None
    elif isinstance(stream, bytes):
        if not stream:
            raise ImageReadError("empty file (0 bytes)")
        stream = io.BytesIO(stream)
    try:
        with Image.open(stream) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageReadError(
                    f"{width}x{height} px is over the limit of {max_pixels} pixels (possible decompression bomb)"
                )
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            mode = img.mode
            if mode == "RGB":
                return img, None
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                return _to_rgb_uint8(np.asarray(img))
            return img.convert("RGB"), f"mode {mode} converted to RGB"
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError("not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Truncated files raise OSError("image file is truncated ...") or SyntaxError.
        kind = "truncated or corrupt image" if "truncat" in str(exc).lower() else "unreadable image"
        raise ImageReadError(f"{kind} ({exc})") from None


def load_item(source: Source, item: Item, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """Decode one item of a source to RGB uint8."""
    if source.arrays:
        key, _, rest = item.path.rpartition("::")[2].partition("[")
        image = source.arrays[key][int(rest[:-1])]
        if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
            raise ImageReadError("image holds NaN or infinite values")
        return _to_rgb_uint8(image)
    return decode_file(item.path, max_pixels)


def iter_batches(
    source: Source,
    batch_size: int = 256,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[Batch]:
    """Decode a source's items in batches; decoding runs on ``workers`` threads.

    Pillow releases the GIL while decoding, so threads use both cores without
    the pickling costs of processes.  Order is preserved.
    """

    def load(item: Item):
        try:
            return load_item(source, item, max_pixels)
        except ImageReadError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        for start in range(0, len(source.items), batch_size):
            chunk = source.items[start : start + batch_size]
            batch = Batch([], [], [], Counter())
            for item, result in zip(chunk, pool.map(load, chunk)):
                if isinstance(result, ImageReadError):
                    batch.failed.append((item, str(result)))
                    continue
                image, note = result
                batch.items.append(item)
                batch.images.append(image)
                if note:
                    batch.conversions[note] += 1
            yield batch
