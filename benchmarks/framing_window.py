"""A trained model scored with other framing windows at test time, alone and averaged.

    .venv/bin/python benchmarks/framing_window.py [--model default] [--data runs/demo/curated] \
        [--windows 0.55,0.6,0.65,0.7,0.75]

A model records the framing window it was trained with (`framing.window`, a fraction of the
image's shorter side). This scores the test split with that window replaced by each of
--windows (the rest of the preprocessing unchanged), then the mean of the calibrated
probabilities over every pair and triple of windows: a test-time augmentation by scale,
which costs one forward pass per window. Writes benchmarks/results/framing_window.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from bloodcell.data import iter_batches, open_source, preprocess
from bloodcell.inference import load_predictor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="an .onnx file, a run directory or 'default'")
    parser.add_argument("--data", type=Path, default=ROOT / "runs/demo/curated", help="a curated dataset (its images/test)")
    parser.add_argument("--windows", default="0.55,0.6,0.65,0.7,0.75")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "framing_window.json")
    args = parser.parse_args()

    predictor = load_predictor(args.model)
    if predictor.framing is None:
        raise SystemExit(f"{args.model}: this model resizes the whole image (no framing window to vary)")
    source = open_source(args.data / "images" / "test", predictor.class_names)
    images, labels = [], []
    for batch in iter_batches(source):
        images += batch.images
        labels += [item.label for item in batch.items]
    labels = np.array(labels)

    def errors(probabilities: np.ndarray) -> int:
        return int((probabilities.argmax(1) != labels).sum())

    probabilities = {}
    for window in [float(w) for w in args.windows.split(",")]:
        framing = {**predictor.framing, "window": window}
        batch = np.stack([preprocess(image, predictor.image_size, framing) for image in images]).transpose(0, 3, 1, 2)
        probabilities[window] = predictor.prepared_probabilities(batch)
        print(f"window {window:.2f}: {errors(probabilities[window])} errors")
    averaged = {}
    for k in (2, 3):
        for combo in itertools.combinations(probabilities, k):
            averaged["+".join(f"{w:g}" for w in combo)] = errors(np.mean([probabilities[w] for w in combo], axis=0))
    best = min(averaged, key=averaged.get)
    print(f"best average of windows: {best}, {averaged[best]} errors")
    result = {"model": str(args.model), "trained_window": predictor.framing.get("window"), "test_images": len(labels),
              "errors_per_window": {f"{w:g}": errors(p) for w, p in probabilities.items()},
              "errors_averaged": averaged}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
