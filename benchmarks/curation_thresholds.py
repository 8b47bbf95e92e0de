"""Where the near-duplicate threshold (10 of 64 bits on dHash *and* pHash) comes from.

    .venv/bin/python benchmarks/curation_thresholds.py [--pbc ../shared/data/pbc224 --sample 400]

1. How far an altered copy moves from its original: on ``--sample`` PBC images, the dHash
   and pHash distance after each near-duplicate transform of ``bloodcell.synthetic`` and a
   4 px shift-and-crop (max, 95th percentile, median).
2. How close distinct images come: over all of PBC, how many images have another image
   within the radius on dHash alone, and on both hashes (what curation uses).
Writes benchmarks/results/curation_thresholds.json.  The contaminant-score margins are
not re-measured here (benchmarks/curation.py measures the resulting precision and recall).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcell.curation import hashing
from bloodcell.data import synthetic

HERE = Path(__file__).resolve().parent


def shift_and_crop(image: np.ndarray, pixels: int = 4) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image[pixels:, pixels:]).resize((w, h), Image.Resampling.BICUBIC))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pbc", type=Path, default=HERE.parent.parent / "shared" / "data" / "pbc224")
    parser.add_argument("--sample", type=int, default=400)
    parser.add_argument("--radius", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "curation_thresholds.json")
    args = parser.parse_args()
    start = time.perf_counter()
    files = sorted(args.pbc.glob("*/*.jpg"))
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    dhash, phash = hashing.dhash_batch(images), hashing.phash_batch(images)

    picks = np.random.default_rng(0).choice(len(images), size=min(args.sample, len(images)), replace=False)
    transforms = {**synthetic.NEAR_DUPLICATE_TRANSFORMS, "shift_and_crop_4px": shift_and_crop}
    copies = {}
    for name, transform in transforms.items():
        altered = [transform(images[i]) for i in picks]
        row = {}
        for hash_name, batch, codes in (("dhash", hashing.dhash_batch, dhash), ("phash", hashing.phash_batch, phash)):
            distance = hashing.hamming(batch(altered), codes[picks])
            row[hash_name] = {"max": int(distance.max()), "p95": float(np.percentile(distance, 95)),
                              "median": float(np.median(distance))}
        copies[name] = row

    # Distinct images: pairs with identical pixels (PBC holds 17 such pairs) are exact duplicates.
    md5 = np.array([hashing.pixel_md5(im) for im in images])
    pairs = hashing.near_pairs(dhash, args.radius)
    pairs = pairs[md5[pairs[:, 0]] != md5[pairs[:, 1]]]
    both = pairs[hashing.hamming(phash[pairs[:, 0]], phash[pairs[:, 1]]) <= args.radius]
    results = {
        "images": len(images), "sample": len(picks), "radius_bits": args.radius,
        "identical_pixel_pairs_left_out": int(len(md5) - len(np.unique(md5))),
        "altered_copy_distance": copies,
        "distinct_images_with_a_neighbour": {"dhash_only": int(len(np.unique(pairs))),
                                             "dhash_and_phash": int(len(np.unique(both)))},
        "pairs_within_radius_on_both": [[files[a].relative_to(args.pbc).as_posix(), files[b].relative_to(args.pbc).as_posix()]
                                        for a, b in both.tolist()],
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "pairs_within_radius_on_both"}, indent=2))


if __name__ == "__main__":
    main()
