import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell.data.augment import AugmentConfig, build_transform

from .conftest import ORIGINALS, require

NOTHING = dict(flips=False, rot90=False, rotation_degrees=0, zoom_scale=None, brightness=0, contrast=0,
               saturation=0, hue=0, stain_shift=0, blur_p=0, pixelate_p=0, jpeg_p=0, erase_p=0, augmix_p=0,
               occlude_p=0)


@pytest.fixture(scope="module")
def cell():
    path = sorted(require(ORIGINALS).glob("*/*.jpg"))[0]
    image = np.asarray(Image.open(path).convert("RGB").resize((64, 64)))
    return torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("switch", [
    {"zoom_scale": (0.2, 0.3)}, {"rotation_degrees": 45}, {"brightness": 0.5}, {"contrast": 0.5},
    {"saturation": 0.9}, {"hue": 0.2}, {"hue": 0.2, "hue_p": 0.5}, {"stain_shift": 0.3}, {"blur_p": 1.0}, {"pixelate_p": 1.0},
    {"jpeg_p": 1.0, "jpeg_quality": (5, 10)}, {"erase_p": 1.0}, {"augmix_p": 1.0}, {"occlude_p": 1.0}, {"shrink_p": 1.0},
])
def test_each_augmentation_changes_the_image_and_keeps_its_format(cell, switch):
    transform = build_transform(AugmentConfig(**{**NOTHING, **switch}), 64)
    torch.manual_seed(0)
    changed = [transform(cell) for _ in range(3)]
    for out in changed:
        assert out.dtype == torch.uint8 and out.shape == cell.shape
    assert any(not torch.equal(out, cell) for out in changed)


def test_hue_jitter_on_no_image_leaves_every_image_as_it_was(cell):
    transform = build_transform(AugmentConfig(**{**NOTHING, "hue": 0.3, "hue_p": 0.0}), 64)
    assert all(torch.equal(transform(cell), cell) for _ in range(3))


def test_everything_off_means_no_transform():
    assert build_transform(AugmentConfig(**NOTHING), 64) is None
    assert build_transform(AugmentConfig(enabled=False), 64) is None


def test_augmentation_is_seeded(cell):
    transform = build_transform(AugmentConfig(), 64)
    torch.manual_seed(5)
    a = transform(cell)
    torch.manual_seed(5)
    assert torch.equal(transform(cell), a)


def test_occluders_are_translucent_and_local(cell):
    """An occluder covers part of the image and lets the cell show through; the rest is untouched."""
    from bloodcell.data.augment import Occlusions

    big = torch.nn.functional.interpolate(cell[None].float(), size=128, mode="bilinear")[0].round().to(torch.uint8)
    torch.manual_seed(1)
    outs = [Occlusions(max_count=1)(big) for _ in range(20)]
    changed_fraction = [float((out != big).any(0).float().mean()) for out in outs]
    assert all(0 < f < 0.6 for f in changed_fraction)
    # translucent: where changed, the output still follows the image (correlation well above zero)
    corr = []
    for out in outs:
        mask = (out != big).any(0)
        a, b = out[:, mask].float().flatten(), big[:, mask].float().flatten()
        if a.numel() > 300:
            corr.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
    assert corr and np.median(corr) > 0.3


def test_a_shrunk_image_sits_whole_in_a_frame_of_its_border_colour(cell):
    """What a padded framing shows of a tight crop: the image, smaller, somewhere in a frame of one colour,
    the median of its border."""
    from bloodcell.data.augment import Shrink

    torch.manual_seed(2)
    out = Shrink((0.5, 0.5))(cell)
    edge = torch.cat([cell[:, 0, :], cell[:, -1, :], cell[:, :, 0], cell[:, :, -1]], dim=-1)
    fill = edge.float().median(dim=-1).values.round().to(torch.uint8)
    framed = (out == fill[:, None, None]).all(0)
    assert framed.float().mean() >= 0.7  # three quarters of a 64 px frame lie outside a 32 px image
    rows, cols = np.nonzero((~framed).numpy())
    assert rows.max() - rows.min() < 32 and cols.max() - cols.min() < 32
    top, left = rows.min(), cols.min()
    small = torch.nn.functional.interpolate(cell[None].float(), size=32, mode="bilinear", antialias=True)[0]
    assert (out[:, top : top + 32, left : left + 32].float() - small).abs().mean() < 3


@pytest.mark.parametrize("settings", [{}, NOTHING, {"enabled": False}])
def test_a_smaller_output_size_shrinks_every_kind_of_transform(cell, settings):
    """Progressive resizing: with zoom, without zoom, with augmentation off, the crop comes out at the size asked."""
    transform = build_transform(AugmentConfig(**settings), 64, output_size=48)
    out = transform(cell)
    assert out.dtype == torch.uint8 and out.shape == (3, 48, 48)
    if settings == NOTHING:  # a plain resize: the same picture, smaller
        assert abs(out.float().mean() - cell.float().mean()) < 3


def test_amplitude_mix_keeps_the_cell_and_takes_the_donors_look(cell, tmp_path):
    """FACT's amplitude mix: with the image as its own donor nothing changes; with another lab's
    cell the colours move towards the donor's while the shapes (the phase) stay the image's."""
    from bloodcell.data.augment import AmplitudeMix

    assert torch.allclose(AmplitudeMix(cell[None], 1.0)(cell).float(), cell.float(), atol=1)
    yellow = torch.zeros_like(cell)
    yellow[0], yellow[1], yellow[2] = 230, 210, 90  # a flat yellow field: all its energy at frequency 0
    torch.manual_seed(0)
    mix = AmplitudeMix(yellow[None], 1.0)
    outs = [mix(cell) for _ in range(20)]
    assert all(out.dtype == torch.uint8 and out.shape == cell.shape for out in outs)
    blue_drop = [float(cell[2].float().mean() - out[2].float().mean()) for out in outs]
    assert max(blue_drop) > 20  # the mean colour moves towards the donor's
    grey = cell.float().mean(0)
    for out in outs:  # the cell's edges stay where they were
        corr = torch.corrcoef(torch.stack([grey.flatten(), out.float().mean(0).flatten()]))[0, 1]
        assert corr > 0.5


def test_foreign_style_loads_donors_through_the_preprocessing_and_skips_bad_files(cell, tmp_path):
    from bloodcell.core.errors import BloodcellError
    from bloodcell.data.augment import load_donors

    donors = tmp_path / "other_lab"
    (donors / "a").mkdir(parents=True)
    Image.fromarray(cell.permute(1, 2, 0).numpy()).save(donors / "a" / "cell.png")
    Image.fromarray(cell.permute(1, 2, 0).numpy()).resize((90, 70)).save(donors / "b.jpg")
    (donors / "broken.png").write_bytes(b"not an image")
    stack = load_donors(donors, 48, {"window": 0.65, "margin": 1.5})
    assert stack.shape == (2, 3, 48, 48) and stack.dtype == torch.uint8
    config = AugmentConfig(**{**NOTHING, "foreign_style": donors, "foreign_style_p": 1.0})
    with pytest.raises(ValueError, match="donors"):
        build_transform(config, 48)
    small = torch.nn.functional.interpolate(cell[None].float(), size=48, mode="area")[0].round().to(torch.uint8)
    assert build_transform(config, 48, donors=stack)(small).shape == (3, 48, 48)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BloodcellError, match="no readable images"):
        load_donors(tmp_path / "empty", 48)
