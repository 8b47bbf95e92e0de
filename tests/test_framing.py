"""Cell localisation and framing: found on real and drawn cells, recorded with the model, used everywhere."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bloodcell.data import preprocess
from bloodcell.data.preprocess import preprocess_batch
from bloodcell.data.framing import FramingConfig, blob_stats, crop_box, frame_cell, locate_cell

from .conftest import ORIGINALS, require

BACKGROUND = (238, 222, 205)  # pale smear
RED_CELL = (215, 160, 160)
NUCLEUS = (95, 45, 140)


def smear(size=200, cell=(130, 70), radius=22, seed=0) -> np.ndarray:
    """A drawn smear: pink red cells all over and one purple nucleus at ``cell`` (x, y)."""
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for _ in range(25):
        x, y = rng.uniform(0, size, 2)
        draw.ellipse((x - 14, y - 14, x + 14, y + 14), fill=RED_CELL)
    x, y = cell
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=NUCLEUS)
    return np.asarray(canvas)


def test_finds_an_off_centre_cell_and_centres_the_window_on_it():
    image = smear(cell=(130, 70))
    found = locate_cell(image)
    assert found is not None
    assert abs(found.cx * 200 - 130) < 5 and abs(found.cy * 200 - 70) < 5
    assert 0.18 < found.extent < 0.28  # a 44 px disc in 200 px
    top, left, side = crop_box(image.shape, found, FramingConfig(window=0.5))
    assert side == 100
    assert top == 20 and left == 80  # centred on (130, 70)


def test_window_stays_inside_the_image_for_a_cell_at_the_edge():
    image = smear(cell=(185, 15), radius=12)
    top, left, side = crop_box(image.shape, locate_cell(image), FramingConfig(window=0.5))
    assert (top, left, side) == (0, 100, 100)


def test_a_tight_crop_is_left_whole():
    """A cell that already fills the frame (another lab's crops) is not cut further."""
    image = smear(size=100, cell=(50, 50), radius=40)
    assert frame_cell(image, FramingConfig()).shape == image.shape


def test_a_padded_tight_crop_shows_its_cell_at_the_same_share_of_the_frame():
    """With ``pad``, a crop of margin x the cell's extent that is larger than the image is filled with the
    image's border colour: a tight crop's cell and a smear's cell then fill the same share of the frame."""
    config = FramingConfig(window=0.3, margin=2.0, pad=True)
    tight = smear(size=100, cell=(50, 50), radius=40)  # the cell fills 80% of the image
    framed = frame_cell(tight, config)
    assert 155 <= framed.shape[0] <= 165 and framed.shape[0] == framed.shape[1]
    assert (framed[:5, :5] == tight[0, 0]).all()  # the border's colour, not Pillow's black
    offset = (framed.shape[0] - 100) // 2
    assert np.array_equal(framed[offset : offset + 100, offset : offset + 100], tight)
    wide = smear(size=400, cell=(200, 200), radius=40)
    share = [2 * 40 / frame_cell(image, config).shape[0] for image in (tight, wide)]
    assert abs(share[0] - share[1]) < 0.03  # each cell fills about half its frame
    assert frame_cell(tight, FramingConfig(window=0.3, margin=2.0)).shape == tight.shape  # without pad: whole
    batch = preprocess_batch([tight, wide], 64, config.model_dump())
    for image, prepared in zip((tight, wide), batch):
        assert np.array_equal(prepared, np.asarray(Image.fromarray(frame_cell(image, config)).resize((64, 64), Image.Resampling.BICUBIC)))


def test_no_stain_contrast_means_a_central_window():
    flat = np.full((120, 160, 3), 200, dtype=np.uint8)
    assert locate_cell(flat) is None
    assert crop_box(flat.shape, None, FramingConfig(window=0.5)) == (30, 50, 60)


def test_the_cell_is_found_on_real_images_even_when_faded_or_speckled():
    from bloodcell.data.corruptions import corrupt

    files = sorted(require(ORIGINALS).glob("*/*.jpg"))[::10]
    for file in files:
        image = np.asarray(Image.open(file).convert("RGB"))
        for version in (image, corrupt(image, "saturation", 5, 0), corrupt(image, "stain_deposits", 5, 0),
                        corrupt(image, "brightness_up", 5, 0)):
            found = locate_cell(version)
            assert found is not None, file
            # PBC cells sit near the middle of the analyser's image
            assert abs(found.cy - 0.5) < 0.25 and abs(found.cx - 0.5) < 0.25, (file, found)


@pytest.mark.parametrize("seed", range(5))
def test_blob_statistics_match_scipy(seed):
    from scipy import ndimage

    mask = ndimage.binary_opening(np.random.default_rng(seed).random((64, 64)) > 0.55)
    labels, count = ndimage.label(mask)
    assert count > 3
    index = np.arange(1, count + 1)
    area, cy, cx = blob_stats(labels, count)
    np.testing.assert_array_equal(area, ndimage.sum(mask, labels, index))
    reference_cy, reference_cx = np.array(ndimage.center_of_mass(mask, labels, index)).T
    np.testing.assert_allclose(cy, reference_cy, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cx, reference_cx, rtol=0, atol=1e-12)


def test_preprocess_frames_then_resizes():
    image = smear(cell=(130, 70))
    framed = preprocess(image, 64, FramingConfig(window=0.5).model_dump())
    assert framed.shape == (64, 64, 3) and framed.dtype == np.uint8
    expected = np.asarray(Image.fromarray(image[20:120, 80:180]).resize((64, 64), Image.Resampling.BICUBIC))
    assert np.array_equal(framed, expected)
    assert not np.array_equal(framed, preprocess(image, 64))


def test_bad_framing_settings_are_refused():
    with pytest.raises(ValueError):
        FramingConfig(window=1.5)
    with pytest.raises(ValueError):
        FramingConfig(margin=0.5)
