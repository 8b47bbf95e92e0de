"""Known-answer corruptions of a dataset: contaminants and near-duplicate copies.

Used by the tests and ``benchmarks/curation.py`` to measure curation against
ground truth, and available to users who want to check a curation setting on
their own data.  Every generator is seeded.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

CONTAMINANT_KINDS = ("photo", "blank", "noise", "drawing")


def _sample_photos() -> list[np.ndarray]:
    # Real photographs that ship with scikit-learn (a temple and a flower).
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def contaminant(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One non-cell RGB uint8 image of the given kind."""
    if kind == "photo":
        photos = _sample_photos()
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(size // 2, min(photo.shape[:2])))
        top = int(rng.integers(0, photo.shape[0] - side))
        left = int(rng.integers(0, photo.shape[1] - side))
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
    if kind == "blank":
        colour = rng.integers(0, 256, size=3)
        noise = rng.normal(0, 2, size=(size, size, 3))
        return np.clip(colour + noise, 0, 255).astype(np.uint8)
    if kind == "noise":
        return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    if kind == "drawing":
        background = tuple(int(v) for v in rng.integers(200, 256, size=3))
        canvas = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, size=4))
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            shape = rng.integers(3)
            box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            if shape == 0:
                draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 6)))
            elif shape == 1:
                draw.ellipse(box, outline=colour, width=int(rng.integers(1, 4)))
            else:
                draw.rectangle(box, fill=colour)
        draw.text((int(rng.integers(0, size // 2)), int(rng.integers(0, size - 12))), "sample 42", fill=(0, 0, 0))
        return np.asarray(canvas)
    raise ValueError(f"unknown contaminant kind {kind!r}; known: {', '.join(CONTAMINANT_KINDS)}")


def jpeg_reencode(image: np.ndarray, quality: int = 75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def brightness_shift(image: np.ndarray, factor: float = 1.08, shift: int = 2) -> np.ndarray:
    """A slightly brighter copy moved by a few pixels (edge pixels repeated)."""
    brighter = np.asarray(ImageEnhance.Brightness(Image.fromarray(image)).enhance(factor))
    padded = np.pad(brighter, ((shift, 0), (shift, 0), (0, 0)), mode="edge")
    return np.ascontiguousarray(padded[: image.shape[0], : image.shape[1]])


def resized(image: np.ndarray, scale: float = 0.75) -> np.ndarray:
    """A copy resized down and back up to the original size (a re-scanned thumbnail)."""
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((int(w * scale), int(h * scale)), Image.Resampling.BICUBIC)
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


NEAR_DUPLICATE_TRANSFORMS = {"jpeg": jpeg_reencode, "brightness_shift": brightness_shift, "resize": resized}


def dihedral(images: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 symmetries of the square: k quarter turns, mirrored when k >= 4
    (k = 0: unchanged). Works on one image (H, W, C) or a stack (..., H, W, C)."""
    out = np.rot90(images, k % 4, axes=(-3, -2))
    return np.ascontiguousarray(np.flip(out, axis=-2) if k >= 4 else out)


def combined_copy(image: np.ndarray, rng: np.random.Generator, turn: bool = False) -> np.ndarray:
    """A near copy carrying every edit at once, as copies in course datasets do.

    In this order: 2-6 px cropped from one side and resized back (per-axis stretch); a shift of
    1-3 px along each axis (edge pixels repeated); for half the copies, resized down to 50-75%
    and back; brightness x0.92-1.08; with ``turn``, one of the 7 quarter turns or mirror
    images; JPEG at quality 60-75. Bicubic resampling throughout.
    """
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    cut = int(rng.integers(2, 7))
    side = int(rng.integers(4))  # which side loses the strip
    box = [(cut, 0, w, h), (0, 0, w - cut, h), (0, cut, w, h), (0, 0, w, h - cut)][side]
    pil = pil.crop(box).resize((w, h), Image.Resampling.BICUBIC)
    dy, dx = (int(v) * int(s) for v, s in zip(rng.integers(1, 4, size=2), rng.choice([-1, 1], size=2)))
    array = np.pad(np.asarray(pil), ((max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)), (0, 0)), mode="edge")
    array = array[max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]
    pil = Image.fromarray(np.ascontiguousarray(array))
    if rng.random() < 0.5:
        scale = rng.uniform(0.5, 0.75)
        small = pil.resize((max(int(w * scale), 1), max(int(h * scale), 1)), Image.Resampling.BICUBIC)
        pil = small.resize((w, h), Image.Resampling.BICUBIC)
    pil = ImageEnhance.Brightness(pil).enhance(float(rng.uniform(0.92, 1.08)))
    array = np.asarray(pil)
    if turn:
        array = dihedral(array, int(rng.integers(1, 8)))
    return jpeg_reencode(np.ascontiguousarray(array), int(rng.integers(60, 76)))
