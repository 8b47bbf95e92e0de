"""What the training augmentation costs per image, beside a training step, on this CPU.

    .venv/bin/python benchmarks/augment_cost.py [--config src/bloodcell/configs/default_model.yaml] \
        [--data runs/demo/curated] [--images 512] [--augmix 0,0.3,0.5]

The recipe augments in the training process (`train.workers: 0`), so every millisecond of
augmentation adds to every step. For the config's augmentation, and the same with AugMix
switched on at each probability of --augmix, it times the per-image transform on real
training images, framed and resized as training stores them, then a training step of the
config's model as `benchmarks/backbones.py` times it (every layer trainable, batch 64,
channels_last).
"share_of_step" is the augmentation's part of the time an image takes through both.
Writes benchmarks/results/augment_cost.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from bloodcell.data.augment import AugmentConfig, build_transform
from bloodcell.data import open_source
from bloodcell.models import create_model
from bloodcell.data.splits import load_split

from backbones import steps_per_s  # the training step that benchmarks/backbones.py times

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def ms_per_image(transform, images: torch.Tensor) -> float:
    for image in images[:32]:  # warm-up
        transform(image)
    start = time.perf_counter()
    for image in images:
        transform(image)
    return (time.perf_counter() - start) / len(images) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "src/bloodcell/configs/default_model.yaml")
    parser.add_argument("--data", type=Path, default=ROOT / "runs/demo/curated", help="a curated dataset (its images/train)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--augmix", default="0,0.3,0.5", help="AugMix probabilities to time, comma-separated")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "augment_cost.json")
    args = parser.parse_args()

    train_config = yaml.safe_load(args.config.read_text())["train"]
    size = train_config.get("image_size", 128)
    source = open_source(args.data / "images" / "train")
    source.items = source.items[:: max(len(source.items) // args.images, 1)][: args.images]
    images = load_split(source, source.class_names, size, framing=train_config.get("framing")).images

    torch.manual_seed(0)
    model, _ = create_model(train_config["model"], 8, pretrained=False)
    step_ms = 1000 / (steps_per_s(model, size, steps=8) * 64)
    results = {"config": str(args.config), "image_size": size, "images": len(images), "threads": torch.get_num_threads(),
               "train_step_ms_per_image": step_ms, "augment": {}}
    print(f"training step: {step_ms:.2f} ms/image ({1000 / step_ms:.0f} img/s without augmentation)")
    for p in [float(v) for v in args.augmix.split(",")]:
        config = AugmentConfig(**{**train_config.get("augment", {}), "augmix_p": p})
        ms = ms_per_image(build_transform(config, size), images)
        share = ms / (ms + step_ms)
        results["augment"][f"augmix_p={p}"] = {"ms_per_image": ms, "share_of_step": share,
                                               "images_per_s_with_step": 1000 / (ms + step_ms)}
        print(f"augmix_p {p:.1f}: augmentation {ms:.2f} ms/image, {share:.0%} of an image's time, "
              f"{1000 / (ms + step_ms):.0f} img/s with the step")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
