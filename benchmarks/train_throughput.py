"""Training images/s: `bloodcell train` against a plain timm/PyTorch loop, in one run.

Same data (a class-balanced subset of ../shared/data/pbc224), same model
(MobileNetV3-Small, all layers trainable), same input size and batch size.

- plain loop: torchvision ImageFolder + DataLoader decoding the JPEGs every
  epoch (2 workers), RandomResizedCrop + flip + ToTensor + Normalize, NCHW;
- bloodcell: images decoded and resized once into a uint8 tensor, uint8
  augmentation on a worker, normalisation inside the network, channels_last.

Images/s are over a full epoch after one warm-up epoch (bloodcell's includes
its one-time decode in a separate figure).  Writes
benchmarks/results/train_throughput.json.

    .venv/bin/python benchmarks/train_throughput.py [--size 128] [--per-class 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision import datasets
from torchvision.transforms import v2

from bloodcell.data import CLASS_NAMES
from bloodcell.training import TrainConfig, train

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE.parent.parent / "shared" / "weights" / "tf_mobilenetv3_small_100.from_tflite_int8ptq.safetensors"


def make_subset(pbc: Path, root: Path, per_class: int) -> None:
    for split, (start, stop) in (("train", (0, per_class)), ("val", (per_class, per_class + per_class // 5))):
        for name in CLASS_NAMES:
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for file in sorted((pbc / name).glob("*.jpg"))[start:stop]:
                shutil.copyfile(file, folder / file.name)


def plain_loop(root: Path, size: int, batch: int, epochs: int) -> float:
    model = timm.create_model("tf_mobilenetv3_small_100", pretrained=False, num_classes=8)
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, scale=(0.75, 1.0), antialias=True),
                            v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(cfg["mean"], cfg["std"])])
    dataset = datasets.ImageFolder(str(root / "images" / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=2, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    model.train()
    rates = []
    for _ in range(epochs):
        seen, start = 0, time.perf_counter()
        for images, labels in loader:
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - start))
    return rates[-1]


def bloodcell_run(root: Path, out: Path, size: int, batch: int, epochs: int) -> tuple[float, float]:
    config = TrainConfig(data=root, out=out, model="tf_mobilenetv3_small_100",
                         weights=WEIGHTS if WEIGHTS.exists() else None, pretrained=WEIGHTS.exists(),
                         image_size=size, batch_size=batch,
                         phases=[{"name": "all", "epochs": epochs, "lr": 1e-3, "trainable": "all"}],
                         augment={"rot90": False, "brightness": 0, "contrast": 0, "saturation": 0, "stain_shift": 0,
                                  "blur_p": 0, "pixelate_p": 0, "jpeg_p": 0})
    start = time.perf_counter()
    result = train(config, log=lambda line: None)
    total = time.perf_counter() - start
    return result.rows[-1]["images_per_s"], total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pbc", type=Path, default=HERE.parent.parent / "shared" / "data" / "pbc224")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "train_throughput.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_subset(args.pbc, root, args.per_class)
        plain = plain_loop(root, args.size, args.batch, args.epochs)
        ours, total = bloodcell_run(root, Path(tmp) / "run", args.size, args.batch, args.epochs)
    results = {"model": "tf_mobilenetv3_small_100", "image_size": args.size, "batch_size": args.batch,
               "train_images": args.per_class * 8, "threads": torch.get_num_threads(),
               "plain_loop_images_per_s": plain, "bloodcell_images_per_s": ours, "ratio": ours / plain,
               "bloodcell_wall_s_including_decode_and_eval": total}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
