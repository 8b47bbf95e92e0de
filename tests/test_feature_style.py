"""Feature-statistics augmentation (MixStyle, DSU): training mode only, statistics moved, content kept."""

import torch

from bloodcell.models.feature_style import (
    FeatureStyle,
    FeatureStyleConfig,
    add_feature_style,
)
from bloodcell.training.config import TrainConfig
from bloodcell.training.trainer import build_model


def feature_maps(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, 6, 6, generator=generator) * torch.arange(1, 9).view(8, 1, 1, 1) + 3.0


def test_dsu_keeps_each_map_normalised_shape_and_moves_statistics():
    x = feature_maps()
    torch.manual_seed(0)
    y = FeatureStyle(FeatureStyleConfig(kind="dsu")).perturb(x)
    assert y.shape == x.shape
    # The normalised map (the content) is the same up to sign (DSU's drawn spread can be negative, as in
    # its reference code); only each channel's mean and spread moved.
    normalise = lambda t: (t - t.mean((2, 3), keepdim=True)) / t.std((2, 3), keepdim=True)
    assert torch.allclose(normalise(y).abs(), normalise(x).abs(), atol=1e-3)
    assert not torch.allclose(y.mean((2, 3)), x.mean((2, 3)), atol=1e-2)


def test_mixstyle_statistics_lie_between_two_images_of_the_batch():
    x = feature_maps()
    torch.manual_seed(0)
    y = FeatureStyle(FeatureStyleConfig(kind="mixstyle", alpha=0.1)).perturb(x)
    means_x, means_y = x.mean((2, 3)), y.mean((2, 3))
    low, high = means_x.min(0).values, means_x.max(0).values
    assert torch.all(means_y >= low - 1e-4) and torch.all(means_y <= high + 1e-4)


def test_hook_acts_in_training_mode_only():
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    net = torch.nn.Module()
    net.blocks = torch.nn.ModuleList([block])
    add_feature_style(net, FeatureStyleConfig(kind="dsu", p=1.0, blocks=[0]))
    x = torch.randn(4, 3, 8, 8)
    block.eval()
    plain = block[0](x)
    assert torch.equal(block(x), plain)
    block.train()
    assert not torch.allclose(block(x), plain)
    off = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    off.register_forward_hook(FeatureStyle(FeatureStyleConfig(p=0.0)))
    off.train()
    assert torch.equal(off(x), off[0](x))


def test_training_config_registers_it_and_evaluation_is_unchanged():
    config = TrainConfig(model="tf_mobilenetv3_small_100", pretrained=False, data="unused",
                         feature_style={"kind": "dsu", "p": 1.0})
    model, _ = build_model(config, [str(i) for i in range(8)], None)
    plain, _ = build_model(config.model_copy(update={"feature_style": None}), [str(i) for i in range(8)], None)
    plain.load_state_dict(model.state_dict())
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))
    model.train()
    plain.train()
    with torch.no_grad():
        assert not torch.allclose(model(images), plain(images))
