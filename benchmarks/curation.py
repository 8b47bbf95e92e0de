"""Curation against known answers, imagededup for comparison, and 1M-image scale runs.

Builds, from ../shared/data/pbc224, a contaminated training file in the course's
format (.npz with images N x 224 x 224 x 3 uint8 and labels) holding every real
image plus known injected items:

- one non-cell photo repeated 1,600 times with labels over all 8 classes, and a
  drawing repeated 200 times (as in the course's training file);
- 40 single odd images (photos, blanks, noise, drawings);
- 300 exact copies of real cells, 50 copies carrying another label (conflicts);
- 300 near copies: JPEG re-encoding (q=70), a small brightness change with a
  2 px shift, and a resize to 75% and back (100 each).

- 300 near copies with every edit at once (``synthetic.combined_copy``: 2-6 px cropped
  and resized back, a 1-3 px shift, half of them resized down to 50-75% and back,
  brightness x0.92-1.08, JPEG at quality 60-75), and for the ``turns`` runs 150 more
  also turned by quarter turns or mirrored.

The set is built at each of ``--sizes`` (224 px as PBC ships, 96 px as the course's
arrays), and ``bloodcell curate`` runs on it with hashes only, with the default
similarity search, and with ``near_turns``. Prints recall per kind of copy, how many
pairs of distinct PBC cells were merged, runs imagededup on the 224 px set where it
is installed, and times the near-duplicate searches over 1,000,000 images: the
similarity search (the default) and the hash search (``near_similarity: null``).
Writes everything to benchmarks/results/curation.json.

    .venv/bin/pip install imagededup   # once, for the comparison
    .venv/bin/python benchmarks/curation.py [--pbc ../shared/data/pbc224]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py

import numpy as np
from PIL import Image

from bloodcell.curation import hashing
from bloodcell.data import synthetic
from bloodcell.curation import CurateConfig, curate
from bloodcell.data import CLASS_NAMES, open_source

HERE = Path(__file__).resolve().parent
# Near duplicates already in PBC, each checked by eye: the same cell captured twice,
# shifted by a few pixels.  They count as true pairs.
KNOWN_PBC_NEAR_PAIRS = [
    ("eosinophil/EO_246684.jpg", "eosinophil/EO_409717.jpg"),
    ("ig/IG_101958.jpg", "ig/IG_957559.jpg"),
    ("ig/IG_466905.jpg", "ig/IG_855229.jpg"),
    ("monocyte/MO_231316.jpg", "monocyte/MO_415531.jpg"),
    # found by the aligned similarity search (twelfth session), each checked by eye
    ("eosinophil/EO_464387.jpg", "eosinophil/EO_800344.jpg"),
    ("eosinophil/EO_481364.jpg", "eosinophil/EO_738318.jpg"),
    ("eosinophil/EO_354514.jpg", "eosinophil/EO_400135.jpg"),
    ("erythroblast/ERB_287222.jpg", "erythroblast/ERB_984537.jpg"),
]


def _load(path: str, size: int) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    if image.size != (size, size):  # the course's 96 px arrays: bicubic, antialiased
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image)


def build_dataset(pbc: Path, seed: int = 0, size: int = 224, combined: int = 300, turned: int = 0):
    rng = np.random.default_rng(seed)
    source = open_source(pbc)
    with ThreadPoolExecutor(2) as pool:
        images = list(pool.map(lambda item: _load(item.path, size), source.items, chunksize=64))
    labels = [item.label for item in source.items]
    position = {Path(item.path).relative_to(pbc).as_posix(): i for i, item in enumerate(source.items)}
    known_pairs = [(position[a], position[b]) for a, b in KNOWN_PBC_NEAR_PAIRS if a in position and b in position]
    # Ground truth: kind of each row, and the real row each copy came from.
    kind = ["real"] * len(images)
    origin = list(range(len(images)))
    n_real = len(images)

    def add(image, label, what, src=-1):
        images.append(image)
        labels.append(int(label))
        kind.append(what)
        origin.append(src)

    photo = synthetic.contaminant("photo", size, rng)
    drawing = synthetic.contaminant("drawing", size, rng)
    for i in range(1600):
        add(photo, i % 8, "contaminant_repeated")
    for i in range(200):
        add(drawing, rng.integers(8), "contaminant_repeated")
    for what in synthetic.CONTAMINANT_KINDS:
        for _ in range(10):
            add(synthetic.contaminant(what, size, rng), rng.integers(8), "contaminant_single")
    picks = rng.choice(n_real, size=650 + combined + turned, replace=False)
    for src in picks[:300]:
        add(images[src].copy(), labels[src], "exact_copy", src)
    for src in picks[300:350]:
        add(images[src].copy(), (labels[src] + 1 + rng.integers(7)) % 8, "conflict_copy", src)
    transforms = list(synthetic.NEAR_DUPLICATE_TRANSFORMS.items())
    for k, src in enumerate(picks[350:650]):
        name, fn = transforms[k % len(transforms)]
        add(fn(images[src]), labels[src], f"near_copy:{name}", src)
    # Every edit at once (synthetic.combined_copy), and with a quarter turn or mirror for the option.
    for src in picks[650 : 650 + combined]:
        add(synthetic.combined_copy(images[src], rng), labels[src], "near_copy:combined", src)
    for src in picks[650 + combined :]:
        add(synthetic.combined_copy(images[src], rng, turn=True), labels[src], "near_copy:combined_turned", src)
    order = rng.permutation(len(images))  # mix the injected rows in
    inverse = np.argsort(order)
    images = np.stack([images[i] for i in order])
    labels = np.array([labels[i] for i in order])
    kind = [kind[i] for i in order]
    origin = [int(inverse[o]) if o >= 0 else -1 for o in (origin[i] for i in order)]
    md5 = [hashing.pixel_md5(im) for im in images]
    # A known real near pair: mark the second as a copy of the first.
    for a, b in known_pairs:
        origin[inverse[b]] = int(inverse[a])
        kind[inverse[b]] = "real_near_copy"
    return images, labels, kind, origin, md5


def truth_components(kind, origin, md5) -> np.ndarray:
    """Per row, its true duplicate group: copies with their sources and identical pixels joined."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.array(sorted(true_pairs(kind, origin, md5)), dtype=np.int64).reshape(-1, 2)
    n = len(kind)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def true_pairs(kind, origin, md5) -> set[tuple[int, int]]:
    """Known duplicate pairs: identical pixels, or a copy and its source (contaminants aside)."""
    is_contaminant = [k.startswith("contaminant") for k in kind]
    pairs = {tuple(sorted((i, o))) for i, o in enumerate(origin) if o >= 0 and o != i}
    by_md5: dict[str, list[int]] = {}
    for i, m in enumerate(md5):
        if not is_contaminant[i]:
            by_md5.setdefault(m, []).append(i)
    for members in by_md5.values():
        pairs.update(combinations(sorted(members), 2))
    return pairs


def score(rows, kind, origin, md5):
    status = [r["status"] for r in rows]
    group = [r["group"] for r in rows]
    n = len(rows)
    is_contaminant = np.array([k.startswith("contaminant") for k in kind])
    flagged = np.array([s == "outlier" for s in status])
    truth_pairs = true_pairs(kind, origin, md5)
    predicted_pairs = set()
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(group):
        if g != "" and not is_contaminant[i]:
            by_group.setdefault(g, []).append(i)
    for members in by_group.values():
        predicted_pairs.update(combinations(sorted(members), 2))
    exact_truth = {p for p in truth_pairs if md5[p[0]] == md5[p[1]]}
    near_truth = truth_pairs - exact_truth
    real = np.array([k.startswith("real") for k in kind])
    conflicts = [i for i, k in enumerate(kind) if k == "conflict_copy"]
    # A false merge is two rows in one found group that belong to different true groups (a copy of
    # a cell joined to that cell's own known twin is not one); among real PBC images alone, the
    # issue's "distinct cells merged".
    component = truth_components(kind, origin, md5)
    false_pairs = sorted(p for p in predicted_pairs if component[p[0]] != component[p[1]])
    false_real = [p for p in false_pairs if real[p[0]] and real[p[1]]]
    group_of = {i: g for i, g in enumerate(group)}
    transforms = sorted({k.split(":", 1)[1] for k in kind if k.startswith("near_copy:")})
    return {
        "items": n,
        "duplicate_pair_precision": len(predicted_pairs & truth_pairs) / max(len(predicted_pairs), 1),
        "duplicate_pair_recall": len(predicted_pairs & truth_pairs) / max(len(truth_pairs), 1),
        "exact_pair_recall": len(predicted_pairs & exact_truth) / max(len(exact_truth), 1),
        "near_duplicate_recall": len(predicted_pairs & near_truth) / max(len(near_truth), 1),
        "near_recall_by_transform": {
            name: float(np.mean([group_of[i] != "" and group_of[i] == group_of[origin[i]]
                                 for i, k in enumerate(kind) if k == f"near_copy:{name}"]))
            for name in transforms
        },
        "false_duplicate_pairs": len(false_pairs),
        "distinct_pbc_pairs_merged": len(false_real),
        "false_duplicate_examples": [[rows[i]["index"], rows[j]["index"]] for i, j in false_pairs[:10]],
        "contaminant_recall": float(flagged[is_contaminant].mean()),
        "contaminant_precision": float((flagged & is_contaminant).sum() / max(flagged.sum(), 1)),
        "contaminants_injected": int(is_contaminant.sum()),
        "label_conflicts_found": sum(status[i] == "label_conflict" and status[origin[i]] == "label_conflict" for i in conflicts),
        "label_conflicts_injected": len(conflicts),
        "real_cells": int(real.sum()),
        "real_cells_flagged_outlier": int((flagged & real).sum()),
        "real_cells_flagged_outlier_fraction": float((flagged & real).sum() / real.sum()),
    }


def imagededup_run(images, kind, origin, md5, pbc: Path) -> dict:
    try:
        from imagededup.methods import DHash, PHash
    except ImportError:
        return {"skipped": "imagededup is not installed (.venv/bin/pip install imagededup)"}
    result = {}
    # Hashing speed on the same JPEG folder, both tools decoding the files.
    for name, method in (("dhash", DHash), ("phash", PHash)):
        start = time.perf_counter()
        encodings = method(verbose=False).encode_images(image_dir=str(pbc), recursive=True)
        elapsed = time.perf_counter() - start
        result[f"{name}_folder_images_per_s"] = len(encodings) / elapsed
    # Duplicate finding on the contaminated array set (default threshold 10).
    method = PHash(verbose=False)
    start = time.perf_counter()
    encodings = {str(i): method.encode_image(image_array=im) for i, im in enumerate(images)}
    result["phash_array_encode_s"] = time.perf_counter() - start
    start = time.perf_counter()
    found = method.find_duplicates(encoding_map=encodings, max_distance_threshold=10)
    result["phash_find_duplicates_s"] = time.perf_counter() - start
    pairs = {tuple(sorted((int(a), int(b)))) for a, dups in found.items() for b in dups}
    is_contaminant = np.array([k.startswith("contaminant") for k in kind])
    pairs = {p for p in pairs if not is_contaminant[p[0]] and not is_contaminant[p[1]]}
    truth = true_pairs(kind, origin, md5)
    near_truth = {p for p in truth if md5[p[0]] != md5[p[1]]}
    result["phash_duplicate_pair_precision"] = len(pairs & truth) / max(len(pairs), 1)
    result["phash_near_duplicate_recall"] = len(pairs & near_truth) / max(len(near_truth), 1)
    result["note"] = "imagededup finds pairs only: no label conflicts, contaminants or splits"
    return result


def bloodcell_folder_rate(pbc: Path) -> float:
    from bloodcell.curation import scan

    source = open_source(pbc)
    start = time.perf_counter()
    scan(source, CurateConfig())
    return len(source.items) / (time.perf_counter() - start)


def scale_run(seed_codes: np.ndarray, n: int = 1_000_000, radius: int = 10, planted: int = 10_000, seed: int = 0) -> dict:
    """1M codes shaped like real ones, with planted near pairs whose recall is checked.

    Each code is a real dHash code with 15-30% of its bits flipped, so codes keep
    the real bit statistics but distinct images stay apart as they do in PBC;
    ``planted`` extra codes are copies of others with 0-10 bits flipped.
    """
    rng = np.random.default_rng(seed)
    base = seed_codes[rng.integers(len(seed_codes), size=n - planted)]
    bits = np.unpackbits(base, axis=1)
    bits ^= rng.random(bits.shape) < rng.uniform(0.15, 0.3, size=(len(bits), 1))
    sources = rng.choice(len(bits), size=planted, replace=False)
    copies = bits[sources].copy()
    for row, flips in zip(copies, rng.integers(0, radius + 1, size=planted)):
        row[rng.choice(row.size, flips, replace=False)] ^= 1
    codes = np.packbits(np.concatenate([bits, copies]), axis=1)
    start = time.perf_counter()
    pairs = hashing.near_pairs(codes, radius)
    elapsed = time.perf_counter() - start
    found = {tuple(p) for p in pairs.tolist()}
    recall = np.mean([(int(s), n - planted + k) in found for k, s in enumerate(sources)])
    return {"hashes": n, "radius": radius, "seconds": elapsed, "pairs_found": int(len(pairs)),
            "planted_pairs": planted, "planted_recall": float(recall)}


def similarity_scale_run(pbc: Path, n: int = 1_000_000, planted: int = 10_000, seed: int = 0) -> dict:
    """The near-duplicate similarity search over 1,000,000 images, with planted combined copies.

    The images are 32 px thumbnails of windows of PBC images (a side of 112-224 px at a place on
    a 16 px grid, in one of the 8 quarter turns and mirror images; no window twice): cell
    pictures, each distinct from the others by more than any near copy's shift or stretch.
    ``planted`` of them get a near copy (every edit at once, made at 96 px); the search must find
    them. Only the search is timed, not the making of the thumbnails.
    """
    from bloodcell.curation import similarity

    rng = np.random.default_rng(seed)
    source = open_source(pbc)
    with ThreadPoolExecutor(2) as pool:
        originals = list(pool.map(lambda item: _load(item.path, 224), source.items, chunksize=64))
    base = n - planted
    # Windows on a grid (sides 1.15x apart, places 16 px apart, 8 turns), none twice from one
    # picture: two windows of one cell then differ by a shift or scale beyond any near copy's.
    grid = [(side, top, left, turn) for side in (112, 128, 148, 170, 196, 224)
            for top in range(0, 225 - side, 16) for left in range(0, 225 - side, 16) for turn in range(8)]
    which = np.arange(base) % len(originals)
    combo = np.empty(base, np.int64)
    per_picture = -(-base // len(originals))
    for picture in range(len(originals)):
        rows = np.flatnonzero(which == picture)
        combo[rows] = rng.choice(len(grid), size=min(per_picture, len(grid)), replace=False)[: len(rows)]
    side, top, left, turn = (np.array([grid[c][k] for c in combo]) for k in range(4))
    def window(i: int, size: int) -> np.ndarray:
        box = (int(left[i]), int(top[i]), int(left[i] + side[i]), int(top[i] + side[i]))
        image = Image.fromarray(originals[which[i]]).resize((size, size), Image.Resampling.BOX, box=box)
        return synthetic.dihedral(np.asarray(image), int(turn[i]))

    def thumb(image: np.ndarray, size: int) -> np.ndarray:
        return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX))

    start = time.perf_counter()
    thumbs = np.empty((n, 32, 32, 3), np.uint8)
    with ThreadPoolExecutor(2) as pool:
        for i, image in enumerate(pool.map(lambda i: window(i, 32), range(base), chunksize=4096)):
            thumbs[i] = image
    sources = rng.choice(base, size=planted, replace=False)
    copies = [synthetic.combined_copy(window(int(i), 96), rng) for i in sources]
    for k, copy in enumerate(copies):
        thumbs[base + k] = thumb(copy, 32)
    made_s = time.perf_counter() - start

    def fine(rows: np.ndarray) -> np.ndarray:
        return np.stack([thumb(copies[r - base], 64) if r >= base else window(int(r), 64) for r in rows])

    start = time.perf_counter()
    found = similarity.similar_pairs(thumbs, fine)
    elapsed = time.perf_counter() - start
    pairs = {tuple(sorted(p)) for p in found.pairs.tolist()}
    recall = float(np.mean([(int(s), base + k) in pairs for k, s in enumerate(sources)]))
    return {"images": n, "seconds": elapsed, "thumbnails_made_s": made_s, "looks": found.looked_at,
            "pairs_found": len(pairs), "planted_pairs": planted, "planted_recall": recall}


def curate_run(pbc: Path, size: int, turned: int, config: CurateConfig, write: bool) -> dict:
    images, labels, kind, origin, md5 = build_dataset(pbc, size=size, turned=turned)
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "train.npz"
        np.savez(npz, images=images, labels=labels, class_names=np.array(CLASS_NAMES))
        start = time.perf_counter()
        curation = curate(npz, Path(tmp) / "curated", config.model_copy(update={"write_images": write}))
        wall = time.perf_counter() - start
    result = {"size": size, "settings": {k: v for k, v in config.model_dump().items() if k.startswith("near")},
              "curate_wall_s": wall, "timings_s": curation.timings, "looks": curation.near_looks,
              **score(curation.rows, kind, origin, md5)}
    return result, (images, kind, origin, md5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pbc", type=Path, default=HERE.parent.parent / "shared" / "data" / "pbc224")
    parser.add_argument("--sizes", default="224,96", help="image sizes to build the contaminated set at")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--only-scale", action="store_true", help="just the 1M searches (hashes, similarity)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "curation.json")
    args = parser.parse_args()

    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": cpu_name()}}
    if not args.only_scale:
        results["runs"] = {}
        for size in [int(s) for s in args.sizes.split(",")]:
            for name, config, turned in (("hashes_only", CurateConfig(near_similarity=None), 0),
                                         ("default", CurateConfig(), 0),
                                         ("turns", CurateConfig(near_turns=True), 150)):
                run, data = curate_run(args.pbc, size, turned, config, write=(name == "default" and size == 224))
                results["runs"][f"{size}px_{name}"] = run
                print(f"{size} px {name}: near recall {run['near_duplicate_recall']:.3f} "
                      f"{run['near_recall_by_transform']}, distinct PBC pairs merged {run['distinct_pbc_pairs_merged']}, "
                      f"false pairs {run['false_duplicate_pairs']}, {run['curate_wall_s']:.0f} s", flush=True)
                if name == "default" and size == 224:
                    images, kind, origin, md5 = data
                    results["bloodcell_folder_images_per_s"] = bloodcell_folder_rate(args.pbc)
                    results["imagededup"] = imagededup_run(images, kind, origin, md5, args.pbc)
                del data
    if not args.skip_scale:
        source = open_source(args.pbc)
        sample = [np.asarray(Image.open(item.path).convert("RGB")) for item in source.items[::3]]
        results["scale"] = scale_run(hashing.dhash_batch(sample))
        print("1M, the hashes-only search (near_similarity: null):", results["scale"], flush=True)
        results["similarity_scale"] = similarity_scale_run(args.pbc)
        print("1M, the default search (similarity):", results["similarity_scale"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if (args.only_scale or args.skip_scale) and args.out.is_file():  # keep the other half's figures
        results = {**json.loads(args.out.read_text()), **results}
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
