"""The similarity search for near duplicates that hashes miss (bloodcell.curation.similarity)."""

import csv

import numpy as np
import pytest
from PIL import Image

from bloodcell import curation as C
from bloodcell.curation import similarity as S
from bloodcell.data import synthetic


def thumbnails(images, size):
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BOX)) for im in images])


@pytest.fixture(scope="module")
def cells96(original_files):
    """The 200 real originals as the course's 96 px arrays, and copies carrying every edit at once."""
    images = [np.asarray(Image.open(p).convert("RGB").resize((96, 96), Image.Resampling.BICUBIC)) for p in original_files]
    rng = np.random.default_rng(3)
    sources = rng.choice(len(images), size=30, replace=False)
    copies = [synthetic.combined_copy(images[s], rng) for s in sources[:20]]
    turned = [synthetic.combined_copy(images[s], rng, turn=True) for s in sources[20:]]
    return np.stack(images + copies + turned), sources


def search(stack, **settings):
    return S.similar_pairs(thumbnails(stack, S.THUMB), lambda rows: thumbnails(stack[rows], S.FINE), **settings)


def pairs_of(found):
    return {tuple(sorted(p)) for p in found.pairs.tolist()}


def test_combined_copies_are_found_and_distinct_cells_are_not_merged(cells96):
    stack, sources = cells96
    n = len(stack) - 30
    found = pairs_of(search(stack))
    plain = {(int(s), n + k) for k, s in enumerate(sources[:20])}
    assert plain <= found
    assert not [p for p in found if p[1] < n]  # no two of the 200 distinct cells
    assert all(p in plain or p[1] >= n + 20 for p in found)  # nothing else but turned copies
    with_turns = search(stack, turns=True)
    turned = {(int(s), n + 20 + k) for k, s in enumerate(sources[20:])}
    assert plain | turned == pairs_of(with_turns)
    assert set(with_turns.turn[[tuple(sorted(p)) in turned for p in with_turns.pairs.tolist()]]) - {0}  # in a turn
    assert 0.9 <= with_turns.similarity.min() and with_turns.similarity.max() <= 1.0


def test_each_look_keeps_fewer_pairs(cells96):
    stack, _ = cells96
    looks = search(stack).looked_at
    assert list(looks) == ["candidates", "spectrum", "first_look", "confirmed"]
    counts = list(looks.values())
    assert counts == sorted(counts, reverse=True) and counts[0] > 10 * counts[-1]


def test_shifted_ncc_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 20, 20, 3)).astype(np.float32)
    b = np.roll(a, (1, -2), axis=(1, 2)) + 0.3 * rng.normal(size=a.shape).astype(np.float32)
    s, width = 3, 20 - 6
    expected = np.full(5, -2.0)
    for p in range(5):
        centre = b[p, s : s + width, s : s + width].ravel()
        for dy in range(2 * s + 1):
            for dx in range(2 * s + 1):
                window = a[p, dy : dy + width, dx : dx + width].ravel()
                expected[p] = max(expected[p], np.corrcoef(window, centre)[0, 1])
    np.testing.assert_allclose(S.shifted_ncc(a, b, s), expected, atol=1e-5)
    assert (expected > 0.9).all()


def test_spectrum_band_gain_is_the_gaussian_band_pass():
    """The band-pass applied as a product in the frequency domain equals scipy's filters (periodic image)."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    image = rng.normal(size=(32, 32)).astype(np.float32)
    wrap = [ndimage.gaussian_filter(image, sigma, mode="wrap", truncate=8) for sigma in S.SPECTRUM_BAND]
    direct = np.abs(np.fft.rfft2(wrap[0] - wrap[1]))
    keep = S.SPECTRUM_KEEP
    low = np.abs(np.fft.rfft2(image))
    low = np.concatenate([low[:keep, :keep], low[-keep + 1 :, :keep]])
    direct = np.concatenate([direct[:keep, :keep], direct[-keep + 1 :, :keep]])
    np.testing.assert_allclose(low * S._band_gain(32, keep), direct, rtol=0.02, atol=0.02 * direct.max())


def test_layout_turns_with_the_image_and_the_spectrum_ignores_a_shift(cells96):
    stack, _ = cells96
    thumbs = thumbnails(stack[:50], 32)
    grid = S.layout_embedding(thumbs).reshape(-1, S.GRID, S.GRID)
    for turn in range(1, 8):
        turned = S.layout_embedding(S.dihedral(thumbs, turn)).reshape(-1, S.GRID, S.GRID)
        np.testing.assert_allclose(turned, S.dihedral(grid[..., None], turn)[..., 0], atol=1e-4)
    shifted = np.roll(thumbs, 1, axis=2)
    cos = np.sum(S.spectrum_embedding(thumbs) * S.spectrum_embedding(shifted), axis=1)
    assert cos.min() > 0.97  # a shift barely moves the spectrum
    assert np.sum(S.spectrum_embedding(thumbs[:1]) * S.spectrum_embedding(thumbs[1:]), axis=1).max() < cos.min()


def test_curate_marks_combined_copies_and_reports_each_pair(tmp_path, cells96):
    stack, sources = cells96
    n = len(stack) - 30
    labels = np.arange(len(stack)) % 8
    labels[n:] = labels[sources]
    npz = tmp_path / "course.npz"
    np.savez(npz, images=stack, labels=labels)
    curation = C.curate(npz, tmp_path / "out", C.CurateConfig(write_images=False))
    with open(tmp_path / "out" / "manifest.csv") as handle:
        rows = list(csv.DictReader(handle))
    plain = [rows[n + k] for k in range(20)]
    assert all(r["status"] == "near_duplicate" for r in plain), [r["status"] for r in plain]
    assert all(rows[int(s)]["group"] == r["group"] != "" for s, r in zip(sources[:20], plain))
    assert sum(r["status"] != "keep" for r in rows[:n]) <= 1  # the distinct cells stay
    aligned = [p for p in curation.near_pairs if p["how"] == "aligned"]
    assert aligned and all(p["similarity"] >= 0.9 for p in aligned)
    report = (tmp_path / "out" / "report.html").read_text()
    assert "Near-duplicate pairs" in report and "aligned similarity 0." in report
    hashes_only = C.curate(npz, tmp_path / "hashes", C.CurateConfig(write_images=False, near_similarity=None))
    assert hashes_only.count("near_duplicate") < curation.count("near_duplicate")
    assert not [p for p in hashes_only.near_pairs if p["how"] == "aligned"]


def test_stretch_is_scipys_affine_transform():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    for sy, sx in ((0.94, 1.0), (1.0, 1.06), (1.03, 0.97)):
        c = 31 / 2
        expected = ndimage.affine_transform(images, [1, 1 / sy, 1 / sx, 1], offset=[0, c - c / sy, c - c / sx, 0],
                                            order=1, mode="nearest")
        np.testing.assert_allclose(S._scaled(images, sy, sx), expected, atol=1e-4)
