"""Training speed of candidate backbones on this CPU: what fits in the recipe's budget.

    .venv/bin/python benchmarks/backbones.py [--size 128] [--steps 12]

For each model: training steps (forward, backward, AdamW) on batches of 64 uint8 images
at --size px, channels_last, every layer trainable, on random data (speed does not depend
on the weights or the pixels), after 3 warm-up steps. Augmentation and evaluation are
left out, so the recipe's real rate is lower (about 215 img/s against the figure here for
MobileNetV3-Small); the ratio between models is what this measures. "epochs_in_40_min" is
how many passes over the 12,285 training images 40 minutes of such steps would make.
Writes benchmarks/results/backbones.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bloodcell.models import CNNConfig, create_model

HERE = Path(__file__).resolve().parent
CANDIDATES = ["tf_mobilenetv3_small_100", "mobilenetv2_100", "tf_efficientnet_lite0", "mobilenetv3_large_100", "cnn"]


def steps_per_s(model: torch.nn.Module, size: int, steps: int, batch: int = 64) -> float:
    model = model.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 8, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(steps + 3):
        if step == 3:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "backbones.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"image_size": args.size, "batch_size": 64, "threads": torch.get_num_threads(), "models": {}}
    for name in CANDIDATES:
        # The same wrapper as training (uint8 in, normalisation inside); random init: speed only.
        model, _ = create_model(name, 8, pretrained=False, cnn=CNNConfig() if name == "cnn" else None)
        rate = steps_per_s(model, args.size, args.steps) * 64
        params = sum(p.numel() for p in model.parameters())
        results["models"][name] = {"train_images_per_s": rate, "params_m": params / 1e6,
                                   "epochs_in_40_min": rate * 40 * 60 / 12_285}
        print(f"{name:26s} {params / 1e6:5.2f} M params {rate:7.0f} img/s  {rate * 2400 / 12_285:5.1f} epochs in 40 min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
