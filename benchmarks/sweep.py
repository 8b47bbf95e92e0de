"""Train variants of a recipe side by side and score each on the test split.

Built to use a lent machine with many cores (and a GPU) for what the 2-core machine cannot:
several full trainings at once, to see what a change is worth against seed noise.

    # here: the curated splits, pre-framed at the model's input size, as JPEG (small enough to carry)
    .venv/bin/python benchmarks/sweep.py pack runs/demo/curated .sweep/data \\
        --config src/bloodcell/configs/default_model.yaml
    # there (or here): each variant is `bloodcell train` with --set overrides, N at a time
    python benchmarks/sweep.py run .sweep/data --config src/bloodcell/configs/default_model.yaml \\
        --variant base --variant seed1:seed=1 --variant ema:ema_decay=0.999 --parallel 4

``pack`` applies the config's framing and resize once (``bloodcell.data.preprocess``, the model's
own path) and saves them as WebP (quality 80, test 90: the 15,359 images of the default
recipe in 31 MB, where the device tool carries at most 64 MiB), so ``run`` trains with
``framing: null`` on the same crops, up to that compression loss: compare variants of one sweep with
each other, not with the figures of a recipe on the original files.
``run`` gives each training ``--workers`` DataLoader processes, then scores its best checkpoint
(temperature fitted on validation) on the test split, with and without 8-fold TTA, and the last
epoch's weights (``keep: last``; benchmarks/checkpoint_choice.py). It prints
a table and writes benchmarks/results/sweep.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

HERE = Path(__file__).resolve().parent


def train_section(config_path: Path) -> dict:
    """The training settings of a recipe config (its ``train:`` section) or of a train config."""
    settings = yaml.safe_load(config_path.read_text())
    return settings.get("train", settings)


def pack(curated: Path, out: Path, config_path: Path, quality: int = 80, test_quality: int = 90,
         workers: int = 2, foreign: list[Path] | None = None) -> dict:
    from bloodcell.data import load_item, open_source, preprocess

    settings = train_section(config_path)
    size, framing = settings.get("image_size", 128), settings.get("framing")
    counts = {}
    sets = [(split, curated / "images" / split, out / "images" / split) for split in ("train", "val", "test")]
    sets += [(f"foreign/{path.name}", path, out / "foreign" / path.name) for path in foreign or []]
    for split, folder, target_dir in sets:
        source = open_source(folder)

        def write(item, source=source, split=split, target_dir=target_dir):
            image = preprocess(load_item(source, item)[0], size, framing)
            target = target_dir / source.class_names[item.label] / (Path(item.path).stem + ".webp")
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(image)).save(target, quality=quality if split in ("train", "val") else test_quality,
                                                              method=4)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(write, source.items))
        counts[split] = len(source.items)
    total = sum(p.stat().st_size for p in (out / "images").rglob("*.webp"))
    info = {"images": counts, "image_size": size, "framing": framing, "format": "webp",
            "quality": {"train": quality, "val": quality, "test": test_quality}, "bytes": total}
    (out / "pack.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return info


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name:key=value,key=value' -> (name, ['key=value', ...]); 'name' alone is the base config."""
    name, _, rest = text.partition(":")
    return name, [s for s in rest.split(",") if s]


def train_and_score(data: Path, config_path: Path, name: str, overrides: list[str], root: Path, workers: int,
                    weights: Path | None = None, quick: bool = False) -> dict:
    """One variant in its own process: `bloodcell train`, then evaluation of its run directory."""
    run_dir = root / name
    settings = train_section(config_path)
    settings.update({"data": str(data), "out": str(run_dir), "framing": None, "workers": workers})
    if weights is not None:  # the config's ../shared path does not travel to another machine
        settings["weights"] = str(weights)
    config_file = root / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(settings, sort_keys=False))
    command = [sys.executable, "-c", "from bloodcell.cli import app; app()", "train", "--config", str(config_file)]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(root / f"{name}.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    train_s = time.perf_counter() - start
    result = {"variant": name, "overrides": overrides, "train_s": round(train_s, 1), "exit_code": code}
    if code != 0:
        result["log_tail"] = (root / f"{name}.log").read_text()[-2000:]
        return result
    from checkpoint_choice import write_last_epoch_run  # beside this file, on the path when run as a script

    from bloodcell.evaluation import evaluate_model
    from bloodcell.models import load_checkpoint

    # The kept checkpoint, with and without TTA, and the last epoch's weights (keep: last); --quick: the kept one alone.
    scored = [("", run_dir, False)]
    if not quick:
        last_dir = write_last_epoch_run(run_dir, root / f"{name}-last")
        scored += [("_tta", run_dir, True), ("_last", last_dir, False)]
    for suffix, model_dir, tta in scored:
        metrics = evaluate_model(model_dir, data, root / f"{name}-eval{suffix}", tta=tta, fields=False)
        result.update({f"accuracy{suffix}": round(metrics["accuracy"], 4), f"macro_f1{suffix}": round(metrics["macro_f1"], 4),
                       f"ece{suffix}": round(metrics["ece"], 4),
                       f"errors{suffix}": int(round((1 - metrics["accuracy"]) * metrics["count"]))})
    # Other labs' cells packed beside the splits (pack --foreign): never trained on, scored as they are.
    for folder in sorted((data / "foreign").glob("*")):
        metrics = evaluate_model(run_dir, folder, root / f"{name}-{folder.name}", fields=False)
        shift = metrics.get("domain_shift") or {}
        result[folder.name] = {key: round(float(metrics[key]), 4) for key in ("accuracy", "balanced_accuracy", "macro_f1", "ece")}
        result[folder.name]["shift_score"] = shift.get("score")
        result[folder.name]["recall"] = {name: round(float(v["recall"]), 3) for name, v in metrics["per_class"].items()
                                         if v.get("support")}
    result["best_epoch"] = load_checkpoint(run_dir / "best.safetensors")[1].get("epoch")
    return result


def run(data: Path, config_path: Path, variants: list[str], parallel: int, workers: int, root: Path, json_path: Path,
        weights: Path | None = None, quick: bool = False) -> list[dict]:
    import torch

    root.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"{len(variants)} variants, {parallel} at a time, {workers} loader workers each, on {device} "
          f"with {os.cpu_count()} cores", flush=True)
    results: list[dict] = []
    lock = threading.Lock()  # variants finish on different threads; each finished one is saved at once

    def one(text):
        name, overrides = parse_variant(text)
        result = train_and_score(data, config_path, name, overrides, root, workers, weights, quick)
        with lock:
            print(json.dumps(result), flush=True)
            results.append(result)
            json_path.write_text(json.dumps({"device": device, "cores": os.cpu_count(), "results": results}, indent=2))
        return result

    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, variants))
    foreign = sorted({key for r in results for key, value in r.items() if isinstance(value, dict)})
    print(f"\n{'variant':<14} {'overrides':<34} {'min':>5} {'acc':>7} {'F1':>7} {'ECE':>7} {'acc TTA':>8} {'acc last':>8}"
          + "".join(f" {name + ' acc/bal/ECE':>20}" for name in foreign))
    for r in sorted(results, key=lambda r: r["variant"]):
        if r["exit_code"]:
            print(f"{r['variant']:<14} failed (exit {r['exit_code']}):\n{r.get('log_tail', '')}")
            continue
        print(f"{r['variant']:<14} {','.join(r['overrides']) or '-':<34} {r['train_s'] / 60:5.1f} "
              f"{r['accuracy']:7.4f} {r['macro_f1']:7.4f} {r['ece']:7.4f} {r.get('accuracy_tta', float('nan')):8.4f} "
              f"{r.get('accuracy_last', float('nan')):8.4f}"
              + "".join(f" {r[n]['accuracy']:6.3f}/{r[n]['balanced_accuracy']:.3f}/{r[n]['ece']:.3f}" if n in r else " -"
                        for n in foreign))
    print(f"sweep wall {(time.perf_counter() - start) / 60:.1f} min; {json_path}")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack")
    p.add_argument("curated", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--quality", type=int, default=80, help="WebP quality of train and val")
    p.add_argument("--test-quality", type=int, default=90, help="WebP quality of test and foreign sets")
    p.add_argument("--foreign", type=Path, action="append", default=[],
                   help="another lab's class folders, framed and packed under OUT/foreign/NAME and scored by run")
    r = commands.add_parser("run")
    r.add_argument("data", type=Path)
    r.add_argument("--config", type=Path, required=True)
    r.add_argument("--variant", action="append", required=True, help="name[:key=value,key=value]")
    r.add_argument("--parallel", type=int, default=1)
    r.add_argument("--workers", type=int, default=0, help="DataLoader workers per training")
    r.add_argument("--weights", type=Path, help="pretrained weights file, where the config's path is not there")
    r.add_argument("--root", type=Path, default=Path("runs/sweep"))
    r.add_argument("--json", type=Path, default=HERE / "results" / "sweep.json")
    r.add_argument("--quick", action="store_true", help="score the kept checkpoint only (no TTA, no last epoch)")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.curated, args.out, args.config, args.quality, args.test_quality, foreign=args.foreign)
    else:
        run(args.data, args.config, args.variant, args.parallel, args.workers, args.root, args.json, args.weights,
            args.quick)


if __name__ == "__main__":
    main()
