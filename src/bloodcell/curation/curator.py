"""Dataset curation: duplicates, label conflicts, contaminants, grouped splits.

``curate(input, out)`` reads any dataset :mod:`bloodcell.data` reads, decodes
each image once, and from that one pass computes a pixel md5 (exact
duplicates), dHash and pHash (near duplicates) and a few colour/stain
statistics plus a tiny colour-layout embedding (contaminants).  It never
writes to the input; everything goes to ``out``:

- ``manifest.csv``: one row per input item with its status and reason;
- ``images/<split>/<class>/...`` (class-folder input) or ``<split>.npz``
  (npz input): the cleaned data;
- ``class_weights.json``, ``summary.json``, ``config.yaml``, ``report.html``.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from ..core.errors import BloodcellError, ImageReadError
from ..data.sources import Item, Source, load_item, open_source
from . import hashing, similarity
from .config import CurateConfig, SplitConfig
from .report import write_curation_report
from .result import SPLITS, Curation, OutlierModel, summarise


# Named, human-readable statistics of a 32x32 thumbnail (colour in [0, 1]).
FEATURE_NAMES = (
    "red",  # mean of each channel
    "green",
    "blue",
    "red_minus_green",  # eosin-pink background and purple stain: red above green
    "blue_minus_green",
    "saturation",
    "contrast",  # standard deviation of brightness
    "stained_area",  # fraction of dark, bluish pixels: nuclei and granules
    "edges",  # mean gradient magnitude
    "fine_texture",  # mean |Laplacian| of the 32x32 pHash thumbnail: noise, print, text
    "flat_area",  # fraction of thumbnail pixels equal to their neighbours: drawings, blanks
)
EMBED_GRID = 8  # colour-layout embedding: mean RGB on an 8x8 grid, symmetrised below


@dataclass
class Scan:
    """What one decoding pass over a source measured, aligned with ``source.items``."""

    source: Source
    ok: np.ndarray  # bool: decoded
    md5: list[str]
    dhash: np.ndarray  # (N, 8) uint8
    phash: np.ndarray  # (N, 8) uint8
    features: np.ndarray  # (N, len(FEATURE_NAMES)) float32
    embedding: np.ndarray  # (N, EMBED_GRID**2 * 3) float32
    sizes: list[tuple[int, int]]
    failures: dict[int, str]  # position in source.items -> reason
    conversions: Counter
    thumbs: np.ndarray | None = None  # (N, 32, 32, 3) uint8 (Pillow BOX): the near-duplicate search's input


def batch_features(thumbs: np.ndarray, for_phash: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stain statistics and colour-layout embedding of a batch of 32x32 RGB thumbnails."""
    thumb = thumbs.astype(np.float32) / 255.0  # (N, 32, 32, 3)
    r, g, b = thumb[..., 0], thumb[..., 1], thumb[..., 2]
    gray = thumb.mean(axis=3)
    hi, lo = thumb.max(axis=3), thumb.min(axis=3)
    saturation = (hi - lo) / np.maximum(hi, 1e-6)
    gy, gx = np.gradient(gray, axis=(1, 2))
    lap = for_phash.astype(np.float32) / 255.0
    laplacian = 4 * lap[:, 1:-1, 1:-1] - lap[:, :-2, 1:-1] - lap[:, 2:, 1:-1] - lap[:, 1:-1, :-2] - lap[:, 1:-1, 2:]
    dark = gray < gray.mean(axis=(1, 2), keepdims=True) - 0.1
    # Micrographs have sensor noise and texture everywhere; drawn or blank areas are
    # exactly flat even at 32x32 (PBC: at most 24% of pixels; drawings: 46% and up).
    steps = thumbs.astype(np.int16)
    flat = (np.abs(np.diff(steps, axis=1))[:, :, :-1].max(axis=3) == 0) & (
        np.abs(np.diff(steps, axis=2))[:, :-1].max(axis=3) == 0
    )
    stats = np.stack(
        [
            r.mean(axis=(1, 2)),
            g.mean(axis=(1, 2)),
            b.mean(axis=(1, 2)),
            (r - g).mean(axis=(1, 2)),
            (b - g).mean(axis=(1, 2)),
            saturation.mean(axis=(1, 2)),
            gray.std(axis=(1, 2)),
            (dark & (b > g)).mean(axis=(1, 2)),
            np.hypot(gx, gy).mean(axis=(1, 2)),
            np.abs(laplacian).mean(axis=(1, 2)),
            flat.mean(axis=(1, 2)),
        ],
        axis=1,
    ).astype(np.float32)
    # Colour layout on an 8x8 grid, made orientation-free (cells come in any
    # orientation) by averaging over the 8 flips/rotations of the dihedral group:
    # radial and colour structure remains, which is what tells cells from photos.
    n = len(thumb)
    grid = thumb.reshape(n, EMBED_GRID, 32 // EMBED_GRID, EMBED_GRID, 32 // EMBED_GRID, 3).mean(axis=(2, 4))
    variants = [np.rot90(grid, k, axes=(1, 2)) for k in range(4)]
    variants += [v[:, :, ::-1] for v in variants]
    embedding = np.mean(variants, axis=0).reshape(n, -1).astype(np.float32)
    return stats, embedding


def scan(source: Source, config: CurateConfig, progress: Callable[[int], None] | None = None) -> Scan:
    """Decode every item once and measure hashes, md5 and statistics."""
    n = len(source.items)
    ok = np.zeros(n, dtype=bool)
    md5 = [""] * n
    dthumbs = np.zeros((n, hashing.HASH_SIZE, hashing.HASH_SIZE + 1), dtype=np.uint8)
    pside = hashing.HASH_SIZE * hashing.PHASH_FACTOR
    pthumbs = np.zeros((n, pside, pside), dtype=np.uint8)
    features = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)
    embedding = np.zeros((n, EMBED_GRID * EMBED_GRID * 3), dtype=np.float32)
    sizes: list[tuple[int, int]] = [(0, 0)] * n
    failures: dict[int, str] = {}
    conversions: Counter = Counter()

    thumbs = np.zeros((n, 32, 32, 3), dtype=np.uint8)

    def measure(item: Item):
        # Runs on worker threads: decoding, Pillow's resizes and md5 release the
        # GIL, so both cores work; the statistics are computed batched below.
        try:
            image_array, note = load_item(source, item, config.max_pixels)
        except ImageReadError as exc:
            return str(exc)
        image = Image.fromarray(image_array)
        for_dhash, for_phash = hashing.hash_thumbnails(image)
        thumb = np.asarray(image.resize((32, 32), Image.Resampling.BOX))
        size = (image_array.shape[1], image_array.shape[0])
        return note, size, hashing.pixel_md5(image_array), for_dhash, for_phash, thumb

    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        for i, result in enumerate(pool.map(measure, source.items, chunksize=64)):
            if isinstance(result, str):
                failures[i] = result
            else:
                note, sizes[i], md5[i], dthumbs[i], pthumbs[i], thumbs[i] = result
                ok[i] = True
                if note:
                    conversions[note] += 1
            if progress and (i + 1) % 256 == 0:
                progress(256)
    if progress:
        progress(n % 256)
    for start in range(0, n, 4096):
        part = slice(start, start + 4096)
        features[part], embedding[part] = batch_features(thumbs[part], pthumbs[part])
    dhash = hashing.dhash_codes(dthumbs)
    phash = hashing.phash_codes(pthumbs)
    return Scan(source, ok, md5, dhash, phash, features, embedding, sizes, failures, conversions, thumbs)


# ---------------------------------------------------------------- duplicates


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each of n nodes given an (M, 2) edge list."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def fine_thumbnails(source: Source, config: CurateConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Items at the similarity search's confirmation size, decoded again (only the few it asks for)."""

    def load(positions: np.ndarray) -> np.ndarray:
        out = np.zeros((len(positions), similarity.FINE, similarity.FINE, 3), np.uint8)
        for k, i in enumerate(positions):
            try:
                image = load_item(source, source.items[int(i)], config.max_pixels)[0]
            except ImageReadError:  # changed since the scan: it matches nothing
                continue
            out[k] = np.asarray(Image.fromarray(image).resize((similarity.FINE,) * 2, Image.Resampling.BOX))
        return out

    return load


def similar_search(thumbs: np.ndarray, fine: Callable[[np.ndarray], np.ndarray], config: CurateConfig
                   ) -> similarity.SimilarPairs:
    """The similarity search with curation's settings."""
    return similarity.similar_pairs(thumbs, fine, neighbours=config.near_neighbours, threshold=config.near_similarity,
                                    turns=config.near_turns)


def duplicate_groups(result: Scan, config: CurateConfig) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """Group decoded items that are exact or near copies.

    Returns (group, exact_group, near, looks): per item, the id of its duplicate group and of
    its exact (same pixels) group, -1 for unreadable items; the near-duplicate pairs (item
    positions ``a``, ``b``, ``how`` found, ``similarity``, ``turn``); and how many pairs reached
    each look of the similarity search. Near duplicates are the pairs the similarity search
    finds and confirms (:mod:`bloodcell.curation.similarity`, the default), or with
    ``near_similarity`` None the pairs close in *both* dHash and pHash (measured:
    docs/curation.md).
    """
    n = len(result.md5)
    exact_group = np.full(n, -1, dtype=np.int64)
    first_of: dict[str, int] = {}
    for i in np.flatnonzero(result.ok):
        exact_group[i] = first_of.setdefault(result.md5[i], len(first_of))
    # One representative per exact group goes into the near-duplicate search.
    reps = np.array(sorted({g: i for i, g in reversed(list(enumerate(exact_group))) if g >= 0}.values()), dtype=np.int64)
    looks: dict = {}
    if config.near_similarity is not None and len(reps) > 1 and result.thumbs is not None:
        # The similarity search alone: on the benchmark's sets the exhaustive hash search links
        # no images that it leaves apart, and it costs 83 s of a million images' search
        # (docs/curation.md). Its pairs would have to pass the same confirmation anyway: at 96 px
        # two distinct cells can be within 10 bits on both hashes.
        load = fine_thumbnails(result.source, config)
        found = similar_search(result.thumbs[reps], lambda rows: load(reps[rows]), config)
        looks = found.looked_at
        near = [{"a": int(reps[i]), "b": int(reps[j]), "how": "aligned", "similarity": round(float(v), 4), "turn": int(t)}
                for (i, j), v, t in zip(found.pairs.tolist(), found.similarity, found.turn)]
        pairs = found.pairs.reshape(-1, 2)
    else:
        pairs = hashing.near_pairs(result.dhash[reps], config.near_dhash)
        if len(pairs):
            pdist = hashing.hamming(result.phash[reps[pairs[:, 0]]], result.phash[reps[pairs[:, 1]]])
            pairs = pairs[pdist <= config.near_phash]
        near = [{"a": int(reps[i]), "b": int(reps[j]), "how": "hashes", "similarity": None, "turn": 0} for i, j in pairs]
    rep_component = _components(len(reps), pairs)
    component_of_exact = np.empty(len(first_of), dtype=np.int64)
    component_of_exact[exact_group[reps]] = rep_component
    group = np.where(exact_group >= 0, component_of_exact[np.maximum(exact_group, 0)], -1)
    return group, exact_group, near, looks


# ---------------------------------------------------------------- contaminants


def _standardise(features: np.ndarray, embedding: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    joined = np.concatenate([features, embedding], axis=1)
    z = (joined - center) / scale
    # Statistics and embedding weigh alike whatever their numbers of dimensions.
    nf = features.shape[1]
    z[:, :nf] /= np.sqrt(nf)
    z[:, nf:] /= np.sqrt(embedding.shape[1])
    return z.astype(np.float32)


def _knn_distance(queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Distance of each query to its k-th nearest reference vector, not counting itself."""
    import faiss

    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(np.ascontiguousarray(reference, dtype=np.float32))
    dist, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + 1)
    # A query in the reference finds itself at distance 0 first; skipping the
    # nearest for every query only makes others' scores slightly lenient.
    return np.sqrt(np.maximum(dist[:, -1], 0))


def fit_outlier_model(features: np.ndarray, embedding: np.ndarray, k: int = 50, seed: int = 0) -> OutlierModel:
    """Fit on the unique images (one per duplicate group) of the dataset itself.

    A cell's 50 nearest neighbours in (stain statistics + colour layout) are
    other cells of its kind, so its distance to the 50th is small; a photo, a
    blank, noise or a drawing has no such neighbourhood, even when a few dozen
    of them sit together (k counts past a small cluster).  The cut is in MADs of
    the dataset's own distances, so a lab with another stain is judged against
    its own cells.  Measured on PBC + injected contaminants: see README.
    """
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    sample = rng.choice(len(features), size=min(len(features), 20000), replace=False)
    joined = np.concatenate([features[sample], embedding[sample]], axis=1)
    center = np.median(joined, axis=0)
    scale = np.maximum(np.median(np.abs(joined - center), axis=0) * 1.4826, 1e-3)
    vectors = _standardise(features[sample], embedding[sample], center, scale)
    projection = PCA(n_components=min(32, vectors.shape[1], len(sample)), random_state=seed).fit(vectors)
    reference = projection.transform(vectors).astype(np.float32)
    k = int(max(1, min(k, len(sample) // 10)))
    dist = _knn_distance(reference, reference, k)
    median = float(np.median(dist))
    mad = float(max(np.median(np.abs(dist - median)) * 1.4826, 1e-6))
    ranges = {
        name: (float(np.percentile(features[sample, j], 1)), float(np.percentile(features[sample, j], 99)))
        for j, name in enumerate(FEATURE_NAMES)
    }
    return OutlierModel(center, scale, projection, reference, k, median, mad, ranges)


def outlier_scores(model: OutlierModel, features: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    """How many MADs above the dataset's typical k-NN distance each image lies."""
    vectors = model.projection.transform(_standardise(features, embedding, model.center, model.scale))
    return (_knn_distance(vectors, model.reference, model.k) - model.median) / model.mad


def evidence(model: OutlierModel, feature_row: np.ndarray, top: int = 3) -> str:
    """The statistics that stray furthest from the dataset's cells, in words."""
    nf = len(FEATURE_NAMES)
    z = (feature_row - model.center[:nf]) / model.scale[:nf]
    parts = []
    for j in np.argsort(-np.abs(z))[:top]:
        lo, hi = model.ranges[FEATURE_NAMES[j]]
        parts.append(f"{FEATURE_NAMES[j]} {feature_row[j]:.3f} (cells {lo:.3f}-{hi:.3f})")
    return "; ".join(parts)


# ---------------------------------------------------------------- decisions


def assign_splits(groups: np.ndarray, labels: np.ndarray, split: SplitConfig) -> np.ndarray:
    """Stratified split that keeps every group whole.

    Within each class, groups are shuffled (seeded) and dealt to train, val and
    test until each split holds its fraction of that class's images.  Returns
    an array of split names, '' where the group id is negative.
    """
    rng = np.random.default_rng(split.seed)
    out = np.full(len(groups), "", dtype=object)
    fractions = np.array([split.train, split.val, split.test])
    for label in np.unique(labels[groups >= 0]):
        members = (labels == label) & (groups >= 0)
        ids, sizes = np.unique(groups[members], return_counts=True)
        order = rng.permutation(len(ids))
        # Each group goes to the split whose quota its midpoint falls in.
        midpoints = (np.cumsum(sizes[order]) - sizes[order] / 2) / sizes.sum()
        chosen = np.searchsorted(np.cumsum(fractions), midpoints, side="right").clip(0, 2)
        split_of = dict(zip(ids[order].tolist(), np.array(SPLITS)[chosen]))
        for i in np.flatnonzero(members):
            out[i] = split_of[groups[i]]
    return out


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """'Balanced' weights, n / (k * n_c), as scikit-learn computes them; 0 for absent classes."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def decide(result: Scan, config: CurateConfig) -> Curation:
    """Turn a scan into per-item statuses, groups and splits."""
    source = result.source
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    group, exact_group, near, looks = duplicate_groups(result, config)
    timings["duplicate_search_s"] = time.perf_counter() - t0
    n = len(source.items)
    labels = np.array([item.label if item.label is not None else -1 for item in source.items], dtype=np.int64)
    members: dict[int, list[int]] = {}
    for i in np.flatnonzero(group >= 0):
        members.setdefault(int(group[i]), []).append(int(i))

    # Outlier scores on one image per group, so repeats count once.
    t0 = time.perf_counter()
    scores = np.full(n, np.nan)
    model = None
    reps = np.array([m[0] for m in members.values()], dtype=np.int64)
    if len(reps) >= 10:
        model = fit_outlier_model(
            result.features[reps], result.embedding[reps], config.outlier_neighbours, config.split.seed
        )
        rep_scores = outlier_scores(model, result.features[reps], result.embedding[reps])
        for gid, score in zip(members, rep_scores):
            scores[members[gid]] = score
    timings["outlier_scoring_s"] = time.perf_counter() - t0

    status = np.full(n, "keep", dtype=object)
    reason = np.full(n, "", dtype=object)
    for i, why in result.failures.items():
        status[i], reason[i] = "unreadable", why
    for gid, rows in members.items():
        copies = len(rows)
        group_labels = sorted({int(labels[i]) for i in rows})
        if copies >= config.max_copies or scores[rows[0]] >= config.outlier_mads:
            why = []
            if copies >= config.max_copies:
                why.append(f"the same picture {copies} times (cells are captured once)")
            if scores[rows[0]] >= config.outlier_mads:
                why.append(f"unlike the dataset's cells: score {scores[rows[0]]:.1f} MADs; " + evidence(model, result.features[rows[0]]))
            if len(group_labels) > 1:
                why.append("labels " + ", ".join(source.label_name(x) for x in group_labels))
            status[rows], reason[rows] = "outlier", " | ".join(why)
        elif len(group_labels) > 1:
            names = ", ".join(f"{source.label_name(x)} x{int(np.sum(labels[rows] == x))}" for x in group_labels)
            status[rows], reason[rows] = "label_conflict", f"copies labelled {names}"
        elif copies > 1:
            keeper = source.items[rows[0]].path
            seen = {exact_group[rows[0]]}
            for i in rows[1:]:
                if exact_group[i] in seen:
                    status[i], reason[i] = "duplicate", f"same pixels as {keeper}"
                else:
                    status[i], reason[i] = "near_duplicate", f"near copy of {keeper}"
                seen.add(exact_group[i])

    # Whole groups go to one split; every member carries it (removed ones too),
    # so the manifest shows that no duplicate straddles two splits.
    split_groups = np.where((status == "keep") | (status == "duplicate") | (status == "near_duplicate"), group, -1)
    splits = assign_splits(split_groups, labels, config.split)
    rows = []
    for i, item in enumerate(source.items):
        rows.append(
            {
                "index": item.index,
                "path": item.path,
                "label": source.label_name(item.label),
                "group": int(group[i]) if group[i] >= 0 and len(members[int(group[i])]) > 1 else "",
                "status": status[i],
                "reason": reason[i],
                "split": splits[i] if status[i] == "keep" else "",
                "width": result.sizes[i][0],
                "height": result.sizes[i][1],
                "md5": result.md5[i],
                "dhash": hashing.to_hex(result.dhash[i]) if result.ok[i] else "",
                "phash": hashing.to_hex(result.phash[i]) if result.ok[i] else "",
                "outlier_score": "" if np.isnan(scores[i]) else round(float(scores[i]), 2),
            }
        )
    for index, path, why in source.problems:
        rows.append({"index": index, "path": path, "label": "", "group": "", "status": "unreadable", "reason": why,
                     "split": "", "width": "", "height": "", "md5": "", "dhash": "", "phash": "", "outlier_score": ""})
    rows.sort(key=lambda row: row["index"])
    position = {row["index"]: k for k, row in enumerate(rows)}
    groups = {
        gid: [position[source.items[i].index] for i in idx] for gid, idx in members.items() if len(idx) > 1
    }
    near_pairs = [{**pair, "a": position[source.items[pair["a"]].index], "b": position[source.items[pair["b"]].index]}
                  for pair in near]
    return Curation(source, config, rows, groups, model, scores, result.conversions, timings, near_pairs, looks)


# ---------------------------------------------------------------- outputs


MANIFEST_COLUMNS = ("index", "path", "label", "group", "status", "reason", "split", "width", "height",
                    "md5", "dhash", "phash", "outlier_score")


def write_manifest(curation: Curation, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(curation.rows)


def _safe_name(path: str, index: int, used: set[str]) -> str:
    name = Path(path.split("::")[0]).name if "::" not in path else f"{index:07d}.png"
    if name in used:
        name = f"{index:07d}_{name}"
    used.add(name)
    return name


def write_clean_data(curation: Curation, out: Path, advance: Callable[[int], None] | None = None) -> None:
    """Copy the kept items into ``out``: class folders per split, or one .npz per split."""
    source = curation.source
    kept = [row for row in curation.rows if row["status"] == "keep"]
    by_index = {item.index: item for item in source.items}
    if source.kind == "folders":
        used: dict[tuple[str, str], set[str]] = {}
        for row in kept:
            folder = out / "images" / row["split"] / row["label"]
            folder.mkdir(parents=True, exist_ok=True)
            name = _safe_name(row["path"], row["index"], used.setdefault((row["split"], row["label"]), set()))
            # Byte-for-byte copy: the cleaned data is the user's files, not re-encodings.
            shutil.copyfile(row["path"], folder / name)
            if advance:
                advance(1)
        return
    for split in SPLITS:
        chosen = [row for row in kept if row["split"] == split]
        # An .npz input holds one array, so every image has the same shape.
        images = [load_item(source, by_index[row["index"]])[0] for row in chosen]
        if advance:
            advance(len(chosen))
        np.savez(
            out / f"{split}.npz",
            images=np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8),
            labels=np.array([by_index[row["index"]].label for row in chosen], dtype=np.int64),
            index=np.array([row["index"] for row in chosen], dtype=np.int64),
            class_names=np.array(source.class_names),
        )


def curate(
    input_path: str | Path,
    out: str | Path,
    config: CurateConfig | None = None,
    class_names: list[str] | None = None,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> Curation:
    """Curate ``input_path`` into ``out``; the input is only read.

    ``progress(description, total)`` is called at the start of each long step and
    returns the function to call with each batch of items done.
    """
    config = config or CurateConfig()
    out = Path(out)
    source = open_source(input_path, class_names)
    if out.resolve() == source.root.resolve() or source.root.resolve() in out.resolve().parents:
        raise BloodcellError(f"{out}: the output must not be inside the input {source.root}")
    if not source.items:
        raise BloodcellError(f"{source.root}: no images found")
    t0 = time.perf_counter()
    result = scan(source, config, progress("reading and hashing", len(source.items)) if progress else None)
    scan_s = time.perf_counter() - t0
    if not result.ok.any():
        first = next(iter(result.failures.values()), "no readable images")
        raise BloodcellError(f"{source.root}: none of the {len(source.items)} images could be read (first reason: {first})")
    curation = decide(result, config)
    curation.timings = {"scan_s": scan_s, **curation.timings}
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(curation, out / "manifest.csv")
    t0 = time.perf_counter()
    if config.write_images:
        kept = sum(row["status"] == "keep" for row in curation.rows)
        write_clean_data(curation, out, progress("writing the cleaned copy", kept) if progress else None)
    curation.timings["write_s"] = time.perf_counter() - t0

    kept = [row for row in curation.rows if row["status"] == "keep"]
    names = source.class_names
    train_labels = np.array([names.index(r["label"]) for r in kept if r["split"] == "train"], dtype=np.int64)
    weights = class_weights(train_labels, len(names))
    counts = Counter(r["label"] for r in kept)
    (out / "class_weights.json").write_text(
        json.dumps(
            {
                "class_names": names,
                "weights": [round(float(w), 6) for w in weights],
                "train_counts": np.bincount(train_labels, minlength=len(names)).tolist(),
                "kept_counts": [counts.get(c, 0) for c in names],
                "imbalance_ratio": round(max(counts.values()) / max(min(counts.get(c, 0) for c in names), 1), 3),
                "formula": "n_train / (n_classes * n_train_c), as sklearn's compute_class_weight('balanced')",
            },
            indent=2,
        )
    )
    (out / "config.yaml").write_text(yaml.safe_dump({"input": str(source.root), **config.model_dump()}, sort_keys=False))
    summary = summarise(curation)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_curation_report(curation, summary, out / "report.html")
    return curation


# ---------------------------------------------------------------- leakage


def check_leakage(first: str | Path, second: str | Path, config: CurateConfig | None = None) -> list[dict]:
    """Images of ``first`` that also appear (exactly or nearly) in ``second``: identical pixels and
    the pairs the similarity search finds and confirms, as in :func:`duplicate_groups`; with
    ``config.near_similarity`` None, identical pixels and pairs close in both hashes."""
    config = config or CurateConfig()
    scans = [scan(open_source(p), config) for p in (first, second)]
    a, b = scans
    ok_a, ok_b = np.flatnonzero(a.ok), np.flatnonzero(b.ok)
    # Identical pixels leak whatever the search says (a flat picture correlates with nothing).
    in_b: dict[str, list[int]] = {}
    for q, j in enumerate(ok_b):
        in_b.setdefault(b.md5[j], []).append(q + len(ok_a))
    exact = {(p, q) for p, i in enumerate(ok_a) for q in in_b.get(a.md5[i], [])}
    similar: dict[tuple[int, int], tuple[float, int]] = {}
    hashed: set[tuple[int, int]] = set()
    if config.near_similarity is not None and len(ok_a) and len(ok_b):
        loads = [fine_thumbnails(a.source, config), fine_thumbnails(b.source, config)]

        def fine(rows: np.ndarray) -> np.ndarray:
            out = np.empty((len(rows), similarity.FINE, similarity.FINE, 3), np.uint8)
            in_a = rows < len(ok_a)
            if in_a.any():
                out[in_a] = loads[0](ok_a[rows[in_a]])
            if (~in_a).any():
                out[~in_a] = loads[1](ok_b[rows[~in_a] - len(ok_a)])
            return out

        found = similar_search(np.concatenate([a.thumbs[ok_a], b.thumbs[ok_b]]), fine, config)
        for (p, q), value, turn in zip(np.sort(found.pairs, axis=1).tolist(), found.similarity, found.turn):
            if p < len(ok_a) <= q:
                similar[(p, q)] = (round(float(value), 4), int(turn))
    elif len(ok_a) and len(ok_b):
        codes = np.concatenate([a.dhash[ok_a], b.dhash[ok_b]])
        pairs = hashing.near_pairs(codes, config.near_dhash)
        pairs = pairs[(pairs[:, 0] < len(ok_a)) & (pairs[:, 1] >= len(ok_a))]
        if len(pairs):
            both = np.concatenate([a.phash[ok_a], b.phash[ok_b]])
            pairs = pairs[hashing.hamming(both[pairs[:, 0]], both[pairs[:, 1]]) <= config.near_phash]
        hashed = {(int(p), int(q)) for p, q in pairs.tolist()}
    pairs = np.array(sorted(exact | set(similar) | hashed), dtype=np.int64).reshape(-1, 2)
    found_rows = []
    for p, q in pairs.tolist():
        i, j = ok_a[p], ok_b[q - len(ok_a)]
        kind = "exact" if a.md5[i] == b.md5[j] else "near"
        value, turn = similar.get((p, q), (None, 0))
        found_rows.append({"first": a.source.items[i].path, "second": b.source.items[j].path, "kind": kind,
                           "dhash_distance": int(hashing.hamming(a.dhash[i], b.dhash[j])),
                           "phash_distance": int(hashing.hamming(a.phash[i], b.phash[j])),
                           "found_by": "similarity" if (p, q) in similar else "hashes" if (p, q) in hashed else "md5",
                           "similarity": value, "turn": turn})
    return found_rows
