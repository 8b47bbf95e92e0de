"""Cell localisation: find the stained cell and crop a standard window around it.

Part of the one preprocessing path (:func:`bloodcell.data.preprocess`): when a model was
trained with framing, training, evaluation, prediction and the service all crop the same way
before the resize. Two things follow:

- resolution: on the PBC analyser's images the cell fills about a third of the frame; a
  window of 65% of the side around it gives the network's 128 px about 1.5x more pixels on
  the cell than resizing the whole image;
- framing: the window is centred on the cell wherever it lies, and it is never smaller than
  the stained cell plus a margin, so an image that is already a tight crop (another lab's
  white-cell crops, the "reframe" corruption) is left whole instead of being cut further.

The window keeps a fixed fraction of the image rather than scaling to the cell, so the cell's
size relative to its neighbouring red cells, a cue that separates lymphocytes from monocytes
and platelets from everything, is kept.

Localisation is classical: `benchmarks/inference.py` measures framing and resize at 970
images/s on one thread against 2,173 for the resize alone (about 0.57 ms more per image,
which costs the service about a third of its throughput under load). On a 64 px copy, a stain
score (purple: red and blue above green; plus darkness) is thresholded halfway between the
image's median and its 99.5th percentile, so it adapts to faded, washed-out or over-exposed
images; the connected blob with the largest area weighted by nearness to the centre is the
cell, together with the stained blobs touching it (lobed nuclei, granules). An image with no
stain contrast is cropped around its centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field
from scipy import ndimage

WORK_SIZE = 64  # localisation runs on a copy this small: fast, and blind to fine texture


class FramingConfig(BaseModel):
    """How a cell is framed before the resize; recorded in the model's contract."""

    window: float = Field(0.65, gt=0, le=1, description="crop side as a fraction of the image's shorter side")
    margin: float = Field(1.5, ge=1, description="the crop is at least this times the stained cell's extent")
    min_contrast: float = Field(15.0, ge=0, description="stain-score contrast below which no cell is sought")


@dataclass(frozen=True)
class CellLocation:
    cy: float  # centre, as fractions of the height and width
    cx: float
    extent: float  # the stained cell's larger bounding-box side, as a fraction of the image's shorter side


def stain_score(image: np.ndarray) -> np.ndarray:
    """Per-pixel score, high on stained nuclei and granules (purple and dark), low on background and red cells."""
    rgb = image.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r + b) / 2 - g + 0.5 * (255 - (r + g + b) / 3)


def blob_stats(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area and centre (row, column) of blobs 1..count of a label image.

    What ``ndimage.sum`` and ``ndimage.center_of_mass`` give for a binary mask, from three
    counts instead of their per-label passes.
    """
    flat = labels.ravel()
    rows, cols = np.indices(labels.shape).reshape(2, -1)
    area = np.bincount(flat, minlength=count + 1)[1:].astype(np.float64)
    cy = np.bincount(flat, weights=rows, minlength=count + 1)[1:] / area
    cx = np.bincount(flat, weights=cols, minlength=count + 1)[1:] / area
    return area, cy, cx


def locate_cell(image: np.ndarray, min_contrast: float = 15.0) -> CellLocation | None:
    """Where the stained cell nearest the centre lies in an RGB uint8 image; None if nothing stands out."""
    height, width = image.shape[:2]
    small = np.asarray(Image.fromarray(image).resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR))
    score = ndimage.uniform_filter(stain_score(small), size=3)
    low, high = np.percentile(score, [50, 99.5])
    if high - low < min_contrast:
        return None
    mask = score > low + 0.5 * (high - low)
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    index = np.arange(1, count + 1)
    area, cy, cx = blob_stats(labels, count)
    off_centre = ((cy - WORK_SIZE / 2) ** 2 + (cx - WORK_SIZE / 2) ** 2) / (0.25 * WORK_SIZE) ** 2
    chosen = index[np.argmax(area * np.exp(-off_centre / 2))]
    # Stained blobs touching the chosen one belong to the same cell (lobes of a nucleus, granules).
    reach = ndimage.binary_dilation(labels == chosen, iterations=3)
    cell = np.isin(labels, np.unique(labels[reach & mask]))
    ys, xs = np.nonzero(cell)
    # Bounding box in pixels of the original image (the work copy is square: scale each axis).
    y0, y1 = ys.min() / WORK_SIZE * height, (ys.max() + 1) / WORK_SIZE * height
    x0, x1 = xs.min() / WORK_SIZE * width, (xs.max() + 1) / WORK_SIZE * width
    extent = max(y1 - y0, x1 - x0) / min(height, width)
    return CellLocation((y0 + y1) / 2 / height, (x0 + x1) / 2 / width, float(extent))


def crop_box(shape: tuple[int, ...], location: CellLocation | None, config: FramingConfig) -> tuple[int, int, int]:
    """(top, left, side) of the square crop for an image of ``shape`` and a cell found (or not) in it."""
    height, width = shape[:2]
    shorter = min(height, width)
    cy, cx, extent = (0.5, 0.5, 0.0) if location is None else (location.cy, location.cx, location.extent)
    side = int(round(min(shorter, max(config.window * shorter, config.margin * extent * shorter))))
    side = max(side, 1)
    # Centred on the cell, shifted back inside the image where the cell is near an edge.
    top = int(round(min(max(cy * height - side / 2, 0), height - side)))
    left = int(round(min(max(cx * width - side / 2, 0), width - side)))
    return top, left, side


def frame_cell(image: np.ndarray, config: FramingConfig | dict) -> np.ndarray:
    """The square crop around the cell (not yet resized); a view into ``image``."""
    config = FramingConfig.model_validate(config)
    top, left, side = crop_box(image.shape, locate_cell(image, config.min_contrast), config)
    return image[top : top + side, left : left + side]
