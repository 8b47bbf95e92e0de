"""metrics.csv and the accuracy and loss curves of a run."""

from __future__ import annotations

import csv
from pathlib import Path


def write_metrics(rows: list[dict], run_dir: Path) -> None:
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        # A run resumed from an older version may lack later columns in its first rows.
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(handle, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(rows, run_dir)

def plot_curves(rows: list[dict], run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [r["epoch"] for r in rows]
    for metric, name in (("accuracy", "accuracy.png"), ("loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(epochs, [r[f"train_{metric}"] for r in rows], marker="o", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in rows], marker="o", label="validation")
        changes = [r["epoch"] for a, r in zip(rows, rows[1:]) if a["phase"] != r["phase"]]
        for x in changes:
            ax.axvline(x - 0.5, color="grey", linestyle=":")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.savefig(run_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
