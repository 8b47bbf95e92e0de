"""Re-run the shipped default model's recipe and check that it gives the same model.

The model card promises that one documented command and config reproduce the shipped
model. This runs that command (``bloodcell recipe --config
src/bloodcell/configs/default_model.yaml``, about 50 minutes on the 2-core machine: run it in
the background, from the repository's root) into a fresh folder, or takes a folder where it
already ran (``--run``), and compares its weights tensor by tensor with ``src/bloodcell/default_model/best.safetensors``
and its ONNX file byte for byte. Writes benchmarks/results/reproduce.json; exits 1 when the
weights differ.

    mkdir -p runs && nohup .venv/bin/python benchmarks/reproduce.py --out runs/reproduce > runs/reproduce.log 2>&1 &
    # a recipe run already there, against the shipped model or an earlier run of the recipe
    .venv/bin/python benchmarks/reproduce.py --run runs/recipe-r13-rerun --against runs/recipe-r13-ema
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bloodcell.workflows import pipeline
from bloodcell.inference import DEFAULT_MODEL_DIR

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "src" / "bloodcell" / "configs" / "default_model.yaml"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_weights(shipped: Path, rerun: Path) -> dict:
    """How many tensors are bitwise equal, and the largest difference among the others."""
    a, b = load_file(str(shipped)), load_file(str(rerun))
    if a.keys() != b.keys():
        return {"same_keys": False, "only_shipped": sorted(a.keys() - b.keys())[:5],
                "only_rerun": sorted(b.keys() - a.keys())[:5], "identical": False}
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    largest = max((float((a[k].double() - b[k].double()).abs().max()) for k in unequal), default=0.0)
    return {"same_keys": True, "tensors": len(a), "unequal_tensors": len(unequal), "largest_difference": largest,
            "identical": not unequal}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pbc", type=Path, default=HERE.parent.parent / "shared" / "data" / "pbc224")
    parser.add_argument("--run", type=Path, help="a folder where the recipe already ran; otherwise run it into --out")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--against", type=Path, default=DEFAULT_MODEL_DIR,
                        help="the model to reproduce: the shipped one, or an earlier recipe folder")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "reproduce.json")
    args = parser.parse_args()
    recipe_s = None
    run_dir = args.run
    if run_dir is None:
        # The recipe writes over an earlier run and may leave its stale files: start from an empty folder.
        if args.out.exists() and any(args.out.iterdir()):
            sys.exit(f"{args.out}: not empty; give a new --out (or --run {args.out} to check what ran there)")
        start = time.perf_counter()
        pipeline.run_recipe(pipeline.load_recipe(RECIPE), args.pbc, args.out)
        recipe_s = time.perf_counter() - start
        run_dir = args.out
    reference = args.against / "best.safetensors"
    if not reference.is_file():  # a recipe folder keeps it under train/
        reference = args.against / "train" / "best.safetensors"
    weights = compare_weights(reference, run_dir / "train" / "best.safetensors")
    onnx_same = sha256(args.against / "model.onnx") == sha256(run_dir / "model.onnx")
    # With --run, what ran is that folder's own resolved recipe, not necessarily today's config file.
    recipe = RECIPE.relative_to(HERE.parent) if args.run is None else run_dir / "recipe.yaml"
    result = {"recipe": str(recipe), "against": str(args.against), "run": str(run_dir), "recipe_s": recipe_s,
              "torch": torch.__version__, "weights": weights, "onnx_identical": onnx_same,
              "reproduced": weights["identical"]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["reproduced"] else 1


if __name__ == "__main__":
    sys.exit(main())
