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
    {"saturation": 0.9}, {"hue": 0.2}, {"stain_shift": 0.3}, {"blur_p": 1.0}, {"pixelate_p": 1.0},
    {"jpeg_p": 1.0, "jpeg_quality": (5, 10)}, {"erase_p": 1.0}, {"augmix_p": 1.0}, {"occlude_p": 1.0},
])
def test_each_augmentation_changes_the_image_and_keeps_its_format(cell, switch):
    transform = build_transform(AugmentConfig(**{**NOTHING, **switch}), 64)
    torch.manual_seed(0)
    changed = [transform(cell) for _ in range(3)]
    for out in changed:
        assert out.dtype == torch.uint8 and out.shape == cell.shape
    assert any(not torch.equal(out, cell) for out in changed)


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


@pytest.mark.parametrize("settings", [{}, NOTHING, {"enabled": False}])
def test_a_smaller_output_size_shrinks_every_kind_of_transform(cell, settings):
    """Progressive resizing: with zoom, without zoom, with augmentation off, the crop comes out at the size asked."""
    transform = build_transform(AugmentConfig(**settings), 64, output_size=48)
    out = transform(cell)
    assert out.dtype == torch.uint8 and out.shape == (3, 48, 48)
    if settings == NOTHING:  # a plain resize: the same picture, smaller
        assert abs(out.float().mean() - cell.float().mean()) < 3
