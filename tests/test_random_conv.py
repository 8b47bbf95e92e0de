"""Random convolutions of the input (RandConv): per-image filters, training mode only, level kept."""

import pytest
import torch
import torch.nn.functional as F

from bloodcell.models.random_conv import RandomConv, RandomConvConfig, _per_image_conv
from bloodcell.training.config import TrainConfig
from bloodcell.training.trainer import build_model


def images(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 16, 16, generator=generator) * torch.linspace(0.5, 2, 6).view(6, 1, 1, 1) + 1.0


def test_grouped_convolution_is_each_image_convolved_alone():
    x = images()
    weight = torch.randn(6, 3, 3, 5, 5)
    out = _per_image_conv(x, weight)
    for i in range(6):
        assert torch.allclose(out[i:i + 1], F.conv2d(x[i:i + 1], weight[i], padding=2), atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_each_image_keeps_its_channel_levels_and_changes_its_texture(k):
    x = images()
    torch.manual_seed(1)
    y = RandomConv(RandomConvConfig(p=1.0, kernel_sizes=[k]))(x)
    assert y.shape == x.shape
    # A mix of the image and its filtered copy moved to the image's own channel means.
    assert torch.allclose(y.mean((2, 3)), x.mean((2, 3)), atol=1e-4)
    assert (y - x).abs().mean() > 0.05
    # Each image drew its own filter: the changes are not one colour map for the whole batch.
    change = (y - x).flatten(1)
    assert not torch.allclose(change[0] / change[0].norm(), change[1] / change[1].norm(), atol=1e-2)


def test_probability_and_seed():
    x = images()
    assert torch.equal(RandomConv(RandomConvConfig(p=0.0))(x), x)
    torch.manual_seed(3)
    first = RandomConv(RandomConvConfig(p=0.5))(x)
    torch.manual_seed(3)
    assert torch.equal(RandomConv(RandomConvConfig(p=0.5))(x), first)
    many = torch.randn(64, 3, 8, 8)
    kept = sum(bool(torch.equal(a, b)) for a, b in zip(RandomConv(RandomConvConfig(p=0.5))(many), many))
    assert 16 <= kept <= 48  # about half the images are left as they are
    with pytest.raises(ValueError, match="odd"):
        RandomConv(RandomConvConfig(kernel_sizes=[2]))


def test_training_config_registers_it_and_evaluation_is_unchanged():
    config = TrainConfig(model="tf_mobilenetv3_small_100", pretrained=False, data="unused",
                         random_conv={"p": 1.0})
    model, _ = build_model(config, [str(i) for i in range(8)], None)
    plain, _ = build_model(config.model_copy(update={"random_conv": None}), [str(i) for i in range(8)], None)
    plain.load_state_dict(model.state_dict())
    batch = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), plain(batch))
    model.train()
    plain.train()
    with torch.no_grad():
        assert not torch.allclose(model(batch), plain(batch))
