"""Acquisition corruptions at five severities, seeded, for robustness evaluation.

The families follow the MedMNIST-C blood benchmark (defocus and motion blur,
JPEG, pixelation, brightness and contrast up/down, saturation, stain deposits,
bubbles), plus re-framing: a central crop so the cell fills most of the frame,
as other analysers and hand-made crops frame cells.  Every function takes and
returns an RGB uint8 (H, W, 3) image; randomness comes only from ``rng``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

SEVERITIES = (1, 2, 3, 4, 5)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image)


def defocus_blur(image, severity, rng):
    radius = (0.6, 1.0, 1.5, 2.0, 3.0)[severity - 1] * image.shape[0] / 224
    return np.asarray(_pil(image).filter(ImageFilter.GaussianBlur(radius)))


def motion_blur(image, severity, rng):
    length = int(round((3, 5, 7, 10, 14)[severity - 1] * image.shape[0] / 224)) | 1
    angle = rng.uniform(0, 180)
    kernel = np.zeros((length, length), dtype=np.float32)
    kernel[length // 2, :] = 1
    kernel = np.array(Image.fromarray(kernel).rotate(angle, resample=Image.Resampling.BILINEAR), dtype=np.float32)
    kernel /= max(kernel.sum(), 1e-6)
    out = np.zeros_like(image, dtype=np.float32)
    padded = np.pad(image.astype(np.float32), ((length // 2,) * 2, (length // 2,) * 2, (0, 0)), mode="edge")
    for dy, dx in zip(*np.nonzero(kernel)):
        out += kernel[dy, dx] * padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def jpeg(image, severity, rng):
    buffer = io.BytesIO()
    _pil(image).save(buffer, "JPEG", quality=(60, 40, 25, 15, 8)[severity - 1])
    return np.asarray(Image.open(buffer).convert("RGB"))


def pixelate(image, severity, rng):
    factor = (0.6, 0.45, 0.35, 0.25, 0.18)[severity - 1]
    h, w = image.shape[:2]
    small = _pil(image).resize((max(int(w * factor), 1), max(int(h * factor), 1)), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST))


def _enhance(kind, factors):
    def apply(image, severity, rng):
        return np.asarray(kind(_pil(image)).enhance(factors[severity - 1]))

    return apply


brightness_up = _enhance(ImageEnhance.Brightness, (1.1, 1.2, 1.3, 1.45, 1.6))
brightness_down = _enhance(ImageEnhance.Brightness, (0.9, 0.8, 0.7, 0.6, 0.5))
contrast_up = _enhance(ImageEnhance.Contrast, (1.15, 1.3, 1.5, 1.75, 2.0))
contrast_down = _enhance(ImageEnhance.Contrast, (0.85, 0.7, 0.55, 0.45, 0.35))
saturation = _enhance(ImageEnhance.Color, (0.7, 0.5, 1.5, 2.0, 0.2))


def stain_deposits(image, severity, rng):
    """Dark purple specks of precipitated stain scattered over the smear."""
    canvas = _pil(image).copy()
    draw = ImageDraw.Draw(canvas)
    h, w = image.shape[:2]
    count = (8, 16, 28, 45, 70)[severity - 1]
    for _ in range(count):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.5, 2.5) * w / 224
        shade = tuple(int(v) for v in rng.integers((40, 10, 60), (110, 50, 130)))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=shade)
    return np.asarray(canvas)


def bubbles(image, severity, rng):
    """Air bubbles: bright discs with a dark rim, lensing what is beneath."""
    out = image.astype(np.float32)
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range((1, 2, 3, 4, 6)[severity - 1]):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.08, 0.2) * w
        d = np.hypot(xx - cx, yy - cy) / r
        inside = d < 1
        rim = (d > 0.85) & (d < 1.05)
        out[inside] = out[inside] * 0.6 + 255 * 0.4
        out[rim] *= 0.55
    return np.clip(out, 0, 255).astype(np.uint8)


def reframe(image, severity, rng):
    """Central crop resized back, so the cell fills more of the frame (severity 5: 45% of the side)."""
    keep = (0.85, 0.75, 0.65, 0.55, 0.45)[severity - 1]
    h, w = image.shape[:2]
    ch, cw = int(round(h * keep)), int(round(w * keep))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = _pil(image[top : top + ch, left : left + cw])
    return np.asarray(crop.resize((w, h), Image.Resampling.BICUBIC))


CORRUPTIONS = {
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "jpeg": jpeg,
    "pixelate": pixelate,
    "brightness_up": brightness_up,
    "brightness_down": brightness_down,
    "contrast_up": contrast_up,
    "contrast_down": contrast_down,
    "saturation": saturation,
    "stain_deposits": stain_deposits,
    "bubbles": bubbles,
    "reframe": reframe,
}


def corrupt(image: np.ndarray, family: str, severity: int, seed: int) -> np.ndarray:
    """One corrupted copy of ``image``; the same (image, family, severity, seed) gives the same result."""
    if family not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {family!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1-5, got {severity}")
    return CORRUPTIONS[family](image, severity, np.random.default_rng(seed))
