"""Re-evaluate the shipped default model and check the figures its model card states.

Curates ../shared/data/pbc224 (seed 0, as the model card says) unless a curated folder is
given, evaluates `--model default` (the ONNX file) on the test split with all corruptions,
and compares accuracy, macro-F1, ECE and the corrupted mean with the figures stored beside
the model (src/bloodcell/default_model/metrics.json, the numbers in MODEL_CARD.md).
Writes benchmarks/results/accuracy.json; exits 1 when a figure differs by more than the
tolerance.

    .venv/bin/python benchmarks/accuracy.py [--curated runs/demo/curated]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bloodcell.curation import curate
from bloodcell.evaluation import evaluate_model
from bloodcell.inference import DEFAULT_MODEL_DIR

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pbc", type=Path, default=HERE.parent.parent / "shared" / "data" / "pbc224")
    parser.add_argument("--curated", type=Path, default=None, help="an existing `bloodcell curate` output")
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "accuracy.json")
    args = parser.parse_args()
    stated = json.loads((DEFAULT_MODEL_DIR / "metrics.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        curated = args.curated
        if curated is None:
            curated = Path(tmp) / "curated"
            curate(args.pbc, curated)
        start = time.perf_counter()
        measured = evaluate_model("default", curated, Path(tmp) / "evaluation", corruptions=True, fields=False)
        seconds = time.perf_counter() - start
    figures = {
        "accuracy": (stated["accuracy"], measured["accuracy"]),
        "macro_f1": (stated["macro_f1"], measured["macro_f1"]),
        "ece": (stated["ece"], measured["ece"]),
        "corrupted_mean": (stated["corruptions"]["mean"], measured["corruptions"]["mean"]),
        "reframe_mean": (stated["corruptions"]["family_mean"]["reframe"], measured["corruptions"]["family_mean"]["reframe"]),
    }
    rows = {name: {"model_card": a, "measured": b, "difference": b - a, "ok": abs(b - a) <= args.tolerance}
            for name, (a, b) in figures.items()}
    result = {"model": "default (ONNX)", "test_images": measured["count"], "evaluation_s": seconds,
              "tolerance": args.tolerance, "figures": rows, "all_match": all(r["ok"] for r in rows.values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["all_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
