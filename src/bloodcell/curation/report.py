"""The curation report: what was found, with thumbnails of every group, in one HTML file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..core.html import esc, page, png_data_uri, table, thumbnail_uri
from ..data.sources import load_item
from .result import Curation

def _class_chart(curation: Curation) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = curation.source.class_names
    fig, ax = plt.subplots(figsize=(8, 3.4))
    bottom = np.zeros(len(names))
    for split, colour in zip(("train", "val", "test"), ("#4c72b0", "#dd8452", "#55a868")):
        counts = Counter(r["label"] for r in curation.rows if r["status"] == "keep" and r["split"] == split)
        values = np.array([counts.get(c, 0) for c in names])
        ax.bar(names, values, bottom=bottom, label=split, color=colour)
        bottom += values
    removed = Counter(r["label"] for r in curation.rows if r["status"] not in ("keep",) and r["label"])
    ax.bar(names, [removed.get(c, 0) for c in names], bottom=bottom, label="removed", color="#c44e52")
    ax.set_ylabel("images")
    ax.set_title("Images per class after curation")
    ax.legend(ncol=4, fontsize=8)
    ax.tick_params(axis="x", rotation=30)
    return png_data_uri(fig)


def _score_chart(curation: Curation) -> str | None:
    import matplotlib.pyplot as plt

    scores = curation.scores[np.isfinite(curation.scores)]
    if not len(scores):
        return None
    is_outlier = np.array([r["status"] == "outlier" for r in curation.rows if r["outlier_score"] != ""])
    fig, ax = plt.subplots(figsize=(8, 2.8))
    bins = np.linspace(min(scores.min(), -5), max(scores.max(), curation.config.outlier_mads * 1.5), 80)
    ax.hist(scores[~is_outlier[: len(scores)]] if len(is_outlier) == len(scores) else scores, bins=bins,
            color="#4c72b0", label="kept / duplicates")
    if len(is_outlier) == len(scores) and is_outlier.any():
        ax.hist(scores[is_outlier], bins=bins, color="#c44e52", label="contaminants")
    ax.axvline(curation.config.outlier_mads, color="k", linestyle="--", label=f"cut ({curation.config.outlier_mads:g} MADs)")
    ax.set_yscale("log")
    ax.set_xlabel("outlier score: MADs above the dataset's typical distance to its 50 nearest neighbours")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return png_data_uri(fig)


TURN_NAMES = ("", "turned 90°", "turned 180°", "turned 270°", "mirrored", "mirrored, turned 90°",
              "mirrored, turned 180°", "mirrored, turned 270°")


def _near_pair_section(curation: Curation, figure, limit: int = 120) -> list[str]:
    """Each near-duplicate pair side by side, the least similar first: those are the ones to check."""
    pairs = curation.near_pairs
    parts = ["<h2>Near-duplicate pairs</h2>"]
    if not pairs:
        return parts + ["<p>None.</p>"]
    looks = curation.near_looks
    if looks:
        parts.append("<p class='muted'>Similarity search: " + ", ".join(f"{esc(k.replace('_', ' '))} {v}" for k, v in looks.items())
                     + " pairs (each look keeps fewer; docs/curation.md).</p>")
    ordered = sorted(pairs, key=lambda p: (p["similarity"] is not None, p["similarity"] or 0.0))
    cards = []
    for pair in ordered[:limit]:
        a, b = curation.rows[pair["a"]], curation.rows[pair["b"]]
        how = "close in dHash and pHash" if pair["how"] == "hashes" else "found by the similarity search"
        if pair["similarity"] is not None:
            how += f"; aligned similarity {pair['similarity']:.3f}" + (f", {TURN_NAMES[pair['turn']]}" if pair["turn"] else "")
        cards.append(f"<div class='group'><div class='thumbs'>{figure(a, a['label'])}{figure(b, b['label'])}</div>"
                     f"<span class='muted'>{esc(how)}</span></div>")
    parts.append("<div class='cards'>" + "".join(cards) + "</div>")
    if len(pairs) > limit:
        parts.append(f"<p class='muted'>{len(pairs) - limit} more pairs; every member is in manifest.csv (column group).</p>")
    return parts


def write_curation_report(curation: Curation, summary: dict, path: Path, max_groups: int = 12) -> None:

    source = curation.source
    items = {item.index: item for item in source.items}

    def thumb(row: dict) -> str:
        try:
            image = load_item(source, items[row["index"]])[0]
        except Exception:  # noqa: BLE001 - a report must not fail on a file that changed meanwhile
            return "<div class='bad'>unreadable</div>"
        return f"<img src='{thumbnail_uri(image)}' alt='{esc(Path(row['path']).name)}'>"

    def figure(row: dict, caption: str) -> str:
        return f"<figure>{thumb(row)}<figcaption>{esc(caption)}</figcaption></figure>"

    rows = curation.rows
    statuses = summary["statuses"]
    parts = [
        "<h1>Curation report</h1>",
        f"<p class='muted'>{esc(summary['input'])} ({esc(summary['format'])}), {summary['items']} items</p>",
        "<h2>Summary</h2>",
        table(["status", "items"], [[s, n] for s, n in statuses.items()], numeric={1}),
        f"<p>{summary['duplicate_groups']} duplicate groups, {summary['label_conflict_groups']} with conflicting labels, "
        f"{summary['contaminant_groups']} contaminants (counting a repeated picture once). "
        + (f"Near duplicates: aligned similarity &ge; {curation.config.near_similarity}"
           + (" in any quarter turn or mirror image" if curation.config.near_turns else "")
           if curation.config.near_similarity is not None else
           f"Near duplicates: dHash &le; {curation.config.near_dhash} and pHash &le; {curation.config.near_phash} bits of 64")
        + ".</p>",
    ]
    parts += ["<h2>Classes</h2>", f"<img src='{_class_chart(curation)}' alt='class distribution'>"]
    weights_path = path.parent / "class_weights.json"
    if weights_path.exists():
        import json

        weights = json.loads(weights_path.read_text())
        parts.append(
            table(
                ["class", "kept", "train", "weight"],
                [[esc(c), k, t, f"{w:.3f}"] for c, k, t, w in zip(weights["class_names"], weights["kept_counts"],
                                                                   weights["train_counts"], weights["weights"])],
                numeric={1, 2, 3},
            )
            + f"<p>Imbalance (largest / smallest class): {weights['imbalance_ratio']}. "
            "Weights are n / (classes &times; n<sub>class</sub>) over the training split.</p>"
        )
    if summary["splits"]:
        parts.append("<p>Split: " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
                     + ". Every member of a duplicate group is assigned to the same split.</p>")

    parts.append("<h2>Contaminants and unusual images</h2>")
    chart = _score_chart(curation)
    if chart:
        parts.append(f"<img src='{chart}' alt='outlier scores'>")
    outlier_groups: dict = {}
    for row in rows:
        if row["status"] == "outlier":
            outlier_groups.setdefault(row["group"] if row["group"] != "" else f"i{row['index']}", []).append(row)
    if outlier_groups:
        ordered = sorted(outlier_groups.values(), key=len, reverse=True)
        cards = []
        for group_rows in ordered[:60]:
            labels = Counter(r["label"] for r in group_rows)
            caption = f"x{len(group_rows)}"
            cards.append(
                f"<div class='group'><div class='thumbs'>{figure(group_rows[0], caption)}<div>"
                f"<b>{len(group_rows)} cop{'y' if len(group_rows) == 1 else 'ies'}</b>, labels: "
                + ", ".join(f"<span class='tag'>{esc(k)} {v}</span>" for k, v in labels.most_common())
                + f"<br><span class='muted'>{esc(group_rows[0]['reason'])}</span><br>"
                f"<span class='muted'>{esc(group_rows[0]['path'])}</span></div></div></div>"
            )
        parts.append("<p>Images unlike the rest of the dataset (photos, blanks, noise, drawings, but also cells "
                     "stained or lit unlike the others) and pictures repeated many times. They are left out of the "
                     "cleaned data; the evidence is beside each, for a person to check.</p>")
        parts.append("<div class='cards'>" + "".join(cards) + "</div>")
        if len(ordered) > 60:
            parts.append(f"<p class='muted'>... and {len(ordered) - 60} more in manifest.csv (status outlier).</p>")
    else:
        parts.append("<p>No contaminants found.</p>")

    parts.append("<h2>Largest duplicate groups</h2>")
    groups = sorted(curation.groups.values(), key=len, reverse=True)
    if not groups:
        parts.append("<p>No duplicates found.</p>")
    for members in groups[:max_groups]:
        group_rows = [rows[k] for k in members]
        labels = Counter(r["label"] for r in group_rows)
        shown = "".join(figure(r, f"{r['label']} · {r['status']}") for r in group_rows[:8])
        parts.append(
            f"<div class='group'><b>{len(group_rows)} images</b>, status <span class='tag'>{esc(group_rows[0]['status'] if group_rows[0]['status'] != 'keep' else group_rows[1]['status'])}</span> labels: "
            + ", ".join(f"<span class='tag'>{esc(k)} {v}</span>" for k, v in labels.most_common())
            + f"<div class='thumbs'>{shown}</div></div>"
        )
    if len(groups) > max_groups:
        parts.append(f"<p class='muted'>{len(groups) - max_groups} more groups in manifest.csv (column group).</p>")

    parts += _near_pair_section(curation, figure)

    conflicts = [r for r in rows if r["status"] == "label_conflict"]
    parts.append("<h2>Label conflicts</h2>")
    if conflicts:
        parts.append("<p>Copies of one picture carry different labels. They are left out of the cleaned data "
                     "for a person to decide.</p>")
        parts.append(table(["image", "path", "label", "group"],
                           [[thumb(r), esc(r["path"]), esc(r["label"]), r["group"]] for r in conflicts[:200]]))
    else:
        parts.append("<p>None.</p>")

    bad = [r for r in rows if r["status"] == "unreadable"]
    parts.append("<h2>Files that could not be used</h2>")
    parts.append(table(["path", "reason"], [[esc(r["path"]), esc(r["reason"])] for r in bad[:500]]) if bad else "<p>None.</p>")
    if len(bad) > 500:
        parts.append(f"<p class='muted'>{len(bad) - 500} more in manifest.csv.</p>")
    if summary["conversions"]:
        parts.append("<h3>Converted while reading</h3>")
        parts.append(table(["conversion", "images"], [[esc(k), v] for k, v in summary["conversions"].items()], numeric={1}))

    parts.append("<h2>Settings and timings</h2>")
    parts.append(table(["setting", "value"], [[esc(k), esc(v)] for k, v in curation.config.model_dump().items()]))
    parts.append(table(["step", "seconds"], [[esc(k), v] for k, v in summary["timings_s"].items()], numeric={1}))
    path.write_text(page("bloodcell curation report", "\n".join(parts)))
