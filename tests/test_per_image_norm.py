"""Per-image normalisation of the early stages (IBN-style): torch's InstanceNorm as the reference,
contrast taken out, the pretrained function kept by recalibration, contracts and ONNX carry it."""

import numpy as np
import pytest
import torch

from bloodcell.core.contract import write_contract
from bloodcell.models import (
    create_model,
    load_model,
    recalibrate_folded_batchnorm,
    save_checkpoint,
)
from bloodcell.models.batchnorm import (
    PerImageNorm,
    _PerImage,
    per_image_norm_layers,
    use_per_image_norm,
)
from bloodcell.training.config import TrainConfig
from bloodcell.training.trainer import build_model

from .conftest import SHARED, require

WEIGHTS = SHARED.parent / "weights" / "tf_mobilenetv3_small_100.from_tflite_int8ptq.safetensors"


def test_matches_torch_instance_norm_in_both_modes_and_keeps_the_state_dict():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-3, 3)
    keys = set(bn.state_dict())
    reference = torch.nn.InstanceNorm2d(5, affine=True, eps=bn.eps)
    reference.load_state_dict({"weight": bn.weight, "bias": bn.bias})
    bn.__class__ = PerImageNorm
    x = torch.randn(4, 5, 7, 9) * 3 + 2
    for mode in (True, False):
        bn.train(mode)
        assert torch.allclose(bn(x), reference(x), atol=1e-5)
    assert set(bn.state_dict()) == keys  # checkpoints load either way


def test_custom_cnn_stages_convert_and_input_contrast_is_taken_out():
    model, _ = create_model("cnn", 8, per_image_norm=1)
    per_image = [m for m in model.modules() if isinstance(m, _PerImage)]
    first_stage = [m for m in model.net.blocks[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert per_image == first_stage and len(per_image) == 2  # two convs in the first block, nothing later
    stage = model.net.blocks[0].eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        # the first conv has no bias: a contrast change of the input scales its output, and the norm takes it out
        assert torch.allclose(stage(x), stage(2.5 * x), atol=1e-3)  # up to eps
        plain, _ = create_model("cnn", 8)
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(plain.net.blocks[0].eval()(x), plain.net.blocks[0](2.5 * x), atol=1e-2)


def test_stages_of_mobilenet_count_the_stem_first():
    model, _ = create_model("tf_mobilenetv3_small_100", 8, pretrained=False)
    net = model.net
    assert per_image_norm_layers(net, 0) == []
    assert per_image_norm_layers(net, 1) == [net.bn1]
    deeper = per_image_norm_layers(net, 3)
    assert deeper[0] is net.bn1 and len(deeper) > 3
    assert all(any(m is layer for m in list(net.blocks[0].modules()) + list(net.blocks[1].modules()))
               for layer in deeper[1:])
    assert use_per_image_norm(net, 3) == len(deeper)
    x = torch.randn(2, net.bn1.num_features, 8, 8) * 5
    with torch.no_grad():  # timm's BatchNormAct2d keeps its activation after the per-image norm
        normed = torch.nn.functional.instance_norm(x, weight=net.bn1.weight, bias=net.bn1.bias, eps=net.bn1.eps)
        expected = net.bn1.act(normed)
        assert torch.allclose(net.bn1.eval()(x), expected, atol=1e-5)


def test_recalibration_keeps_the_pretrained_function_for_typical_images():
    require(WEIGHTS)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(60, 200, (96, 3, 64, 64), generator=generator, dtype=torch.uint8)
    pretrained, _ = create_model("tf_mobilenetv3_small_100", 8, WEIGHTS)
    model, _ = create_model("tf_mobilenetv3_small_100", 8, WEIGHTS, per_image_norm=3)
    model.load_state_dict(pretrained.state_dict())
    recalibrate_folded_batchnorm(model, images)
    pretrained.eval()
    model.eval()
    with torch.no_grad():
        a, b = pretrained.features(images[:16]), model.features(images[:16])
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.95
    assert all(m.per_image for m in model.modules() if isinstance(m, _PerImage))  # switched back on after measuring


def saved_run(directory, stages: int):
    """A run directory (contract and checkpoint) of an untrained MobileNetV3 with per-image stages."""
    config = TrainConfig(model="tf_mobilenetv3_small_100", pretrained=False, data="unused", per_image_norm=stages)
    model, contract = build_model(config, [str(i) for i in range(8)], None)
    write_contract(directory, contract)
    save_checkpoint(directory / "best.safetensors", model.state_dict(), {"epoch": 1})
    return model.eval(), contract


def test_a_saved_run_loads_back_with_per_image_layers(tmp_path):
    model, contract = saved_run(tmp_path, 2)
    assert contract.per_image_norm == 2
    loaded, loaded_contract = load_model(tmp_path)
    assert loaded_contract.per_image_norm == 2
    layers = per_image_norm_layers(loaded.net, 2)
    assert layers and all(isinstance(m, _PerImage) for m in layers)
    assert not any(isinstance(m, _PerImage) for m in per_image_norm_layers(loaded.net, 3)[len(layers):])
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_the_projects_onnx_export_keeps_per_image_statistics(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from bloodcell.inference.export import export_onnx

    (tmp_path / "run").mkdir()
    saved_run(tmp_path / "run", 3)
    rng = np.random.default_rng(0)
    # images of different contrast: a per-image layer exported as a fixed BatchNorm would answer differently
    check = [(rng.random((80, 80, 3)) * scale + offset).astype(np.uint8) for scale, offset in ((255, 0), (60, 100), (120, 20))]
    report = export_onnx(tmp_path / "run", tmp_path / "model.onnx", check_images=check)
    assert report["checked_images"] == 3 and report["max_prob_diff"] < 1e-4
    ops = [node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert ops.count("InstanceNormalization") == len(per_image_norm_layers(load_model(tmp_path / "run")[0].net, 3))
