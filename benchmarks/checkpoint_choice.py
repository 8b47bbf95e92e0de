"""Which weights to ship: the best-validation checkpoint, or the last epoch's?

For each finished training run (a recipe's ``train/`` folder or a sweep's run), scores on the
test split of the data it trained on:

- ``best``: its ``best.safetensors``, as the run kept it (``keep: best``, the epoch with the best
  validation ``monitor``);
- ``last``: the last epoch's weights (the EMA's, where the run kept one) from ``last.safetensors``,
  what ``keep: last`` ships, with the softmax temperature refitted on validation as training does.

Both come from the same training, so each run gives one paired comparison, free of seed noise
between trainings. Prints a table and writes benchmarks/results/checkpoint_choice.json (or --json).

    .venv/bin/python benchmarks/checkpoint_choice.py runs/recipe-r13-ema/train runs/recipe-r17-subclasses/train
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def run_data(run_dir: Path) -> Path:
    """The dataset a run trained on, as its config.yaml records it (a recipe's curated folder)."""
    return Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"])


def write_last_epoch_run(run_dir: Path, out: Path) -> Path:
    """A copy of ``run_dir``'s model files whose kept checkpoint is the last epoch's weights, calibrated on validation."""
    from bloodcell.data import training_sources
    from bloodcell.evaluation.calibration import calibrate_run
    from bloodcell.training.saver import last_epoch_weights
    from bloodcell.data.splits import load_split
    from bloodcell.models import save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.json", "config.yaml"):
        shutil.copy(run_dir / name, out / name)
    weights, meta = last_epoch_weights(run_dir)
    save_checkpoint(out / "best.safetensors", weights, {**meta, "keep": "last"})
    model_meta = json.loads((out / "model.json").read_text())
    sources, _ = training_sources(run_data(run_dir))  # the validation split as training found it
    val_split = load_split(sources["val"], model_meta["class_names"], model_meta["image_size"],
                           framing=model_meta.get("framing"))
    calibrate_run(out, val_split.images, val_split.labels, log=lambda _: None)
    return out


def compare(run_dir: Path, work: Path, corruptions: bool = False) -> dict:
    """Score the best-validation and the last-epoch weights of one run on its test split."""
    from bloodcell.evaluation import evaluate_model
    from bloodcell.models import load_checkpoint

    data = run_data(run_dir)
    last_dir = write_last_epoch_run(run_dir, work / "last")
    result = {"run": str(run_dir), "data": str(data)}
    for name, model_dir in (("best", run_dir), ("last", last_dir)):
        _, meta = load_checkpoint(model_dir / "best.safetensors")
        metrics = evaluate_model(model_dir, data, work / f"eval-{name}", corruptions=corruptions, fields=False)
        test_count = metrics["count"]
        result[name] = {"epoch": meta.get("epoch"), "val_macro_f1": meta.get("val", {}).get("macro_f1"),
                        "accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
                        "ece": round(metrics["ece"], 4), "errors": int(round((1 - metrics["accuracy"]) * test_count))}
        if corruptions:
            result[name]["corrupted_mean"] = round(metrics["corruptions"]["mean"], 4)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="training run directories (with last.safetensors)")
    parser.add_argument("--work", type=Path, default=Path("runs/checkpoint-choice"))
    parser.add_argument("--corruptions", action="store_true", help="also score the corrupted test split (slow)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "checkpoint_choice.json")
    args = parser.parse_args()
    results = []
    for run_dir in args.runs:
        result = compare(run_dir, args.work / run_dir.parent.name / run_dir.name, args.corruptions)
        print(json.dumps(result), flush=True)
        results.append(result)
        args.json.write_text(json.dumps({"results": results}, indent=2))
    print(f"\n{'run':<44} {'best epoch':>10} {'errors':>6} {'last epoch':>10} {'errors':>6}")
    for r in results:
        print(f"{r['run']:<44} {r['best']['epoch']:>10} {r['best']['errors']:>6} {r['last']['epoch']:>10} {r['last']['errors']:>6}")
    diffs = [r["last"]["errors"] - r["best"]["errors"] for r in results]
    print(f"last minus best, errors: {diffs}; mean {sum(diffs) / len(diffs):+.2f}")


if __name__ == "__main__":
    main()
