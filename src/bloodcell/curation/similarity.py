"""Near duplicates that hashes miss: copies re-encoded, re-lit, shifted, cropped and resized at once.

At 96 px such a copy can move 20-30 bits of 64 in dHash and pHash, as far as distinct cells lie,
so no hash radius finds it without merging distinct cells (docs/experiments.md, tenth and
twelfth sessions). Here a pair has to pass four looks, each costlier than the last and applied
to fewer pairs, each measured to keep every copy (`benchmarks/curation.py`):

1. **Candidates**: each image's ``k`` nearest neighbours by its *layout*: the grey 32 px
   thumbnail resampled so that its stain-weighted centre is central and its spread fixed
   (blind to shifts and to a stretch along either axis), averaged to 8 x 8.
2. **Spectrum**: the cosine of the two images' Fourier magnitudes (grey band-pass, a Hann
   window, the lowest frequencies). A magnitude does not move when the image does, so a copy
   scores near 1 however it was shifted; cells alike in layout but not the same score lower.
3. **First look**: the best normalised cross-correlation (NCC) of the band-passed 32 px RGB
   thumbnails over shifts of up to 2 px.
4. **Confirmation**: the images again at 64 px, the best stretch of one axis (0.94-1.06) found
   at 32 px, then the best NCC of the band-passed 64 px images over shifts of up to 4 px. A copy
   scores above 0.93 and distinct PBC cells below 0.79 (measured); ``threshold`` sits between.

With ``turns``, every image is also looked up turned by quarter turns and mirrored (the
8 symmetries of the square), and the pair is compared in the turn that matched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..data.synthetic import dihedral

THUMB = 32  # the scan's thumbnails
FINE = 64  # the confirmation's
GRID = 8  # the layout embedding's side
SPECTRUM_BAND = (0.7, 3.0)  # Gaussian sigmas of the spectrum's band-pass, thumbnail pixels
SPECTRUM_KEEP = 12  # lowest frequencies kept per axis
FIRST_BAND = (0.7, 3.0)
FINE_BAND = (1.0, 4.0)
SCALES = (0.94, 0.97, 1.0, 1.03, 1.06)
# A crop resized back stretches one axis: per-axis scales with the other axis at 1.
STRETCHES = tuple(sorted({(s, 1.0) for s in SCALES} | {(1.0, s) for s in SCALES}))
EXACT_SEARCH_LIMIT = 200_000  # above it, the candidates come from an inverted-file index


@dataclass
class SimilarPairs:
    """Pairs (i, j) of near duplicates: ``turn`` is the symmetry that maps j onto i (0: none)."""

    pairs: np.ndarray  # (M, 2) int64; i < j where turn is 0
    turn: np.ndarray  # (M,) int64 in 0..7
    similarity: np.ndarray  # (M,) float32: the confirmation's NCC
    looked_at: dict  # how many pairs reached each look


def _grey(thumbs: np.ndarray) -> np.ndarray:
    return np.asarray(thumbs).sum(axis=3, dtype=np.float32) / np.float32(thumbs.shape[3])


def _threaded(function, parts: list) -> list:
    """``function`` over ``parts`` on one thread per core: NumPy, SciPy and the FFTs release the GIL."""
    if len(parts) < 2:
        return [function(part) for part in parts]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(parts), os.cpu_count() or 1)) as pool:
        return list(pool.map(function, parts))


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the two image axes of (N, H, W[, C])."""
    from scipy import ndimage

    return ndimage.gaussian_filter(x, [0.0, sigma, sigma] + [0.0] * (x.ndim - 3))


def band_pass(x: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Difference of Gaussians over the two image axes of (N, H, W[, C]): the shared light
    background and the overall round shape of a centred cell do not make two cells alike."""
    x = np.asarray(x, np.float32)
    return _gaussian(x, band[0]) - _gaussian(x, band[1])


def _sampling_matrices(centre: np.ndarray, zoom: np.ndarray, size: int, out: int) -> np.ndarray:
    """(N, out, size) linear-interpolation weights sampling ``out`` points ``zoom`` input pixels
    apart around ``centre`` (edge pixels repeated)."""
    steps = np.arange(out, dtype=np.float32) - (out - 1) / 2
    where = np.clip(centre[:, None] + steps[None, :] * zoom[:, None], 0, size - 1)  # (N, out)
    pixels = np.arange(size, dtype=np.float32)
    return np.clip(1 - np.abs(where[:, :, None] - pixels[None, None, :]), 0, None)


def _box(size: int, out: int) -> np.ndarray:
    """(out, size) averaging weights: each output pixel is the mean over its span of input pixels."""
    edges = np.linspace(0, size, out + 1)
    overlap = np.clip(np.minimum(edges[1:, None], np.arange(size)[None] + 1) - np.maximum(edges[:-1, None], np.arange(size)[None]), 0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def layout_embedding(thumbs: np.ndarray, spread: float = 0.22, chunk: int = 32768) -> np.ndarray:
    """(N, 64) unit vectors: the grey thumbnail in its own frame (stain-weighted centre at the
    middle, per-axis spread fixed), averaged to 8 x 8, zero mean."""
    if len(thumbs) > chunk:
        return np.concatenate(_threaded(lambda s: layout_embedding(thumbs[s : s + chunk], spread, chunk),
                                        list(range(0, len(thumbs), chunk))))
    grey = _grey(thumbs)
    n, size = grey.shape[:2]
    flat = grey.reshape(n, -1)
    background = np.partition(flat, int(0.9 * flat.shape[1]), axis=1)[:, int(0.9 * flat.shape[1]), None, None]
    weight = np.clip(background - grey, 0, None) ** 2  # the dark, stained parts count most
    weight /= np.maximum(weight.sum(axis=(1, 2), keepdims=True), 1e-6)
    axis = np.arange(size, dtype=np.float32)
    cy, cx = (weight.sum(axis=2) * axis).sum(axis=1), (weight.sum(axis=1) * axis).sum(axis=1)
    sy = np.sqrt((weight.sum(axis=2) * (axis - cy[:, None]) ** 2).sum(axis=1))
    sx = np.sqrt((weight.sum(axis=1) * (axis - cx[:, None]) ** 2).sum(axis=1))
    zoom_y = np.maximum(sy, 0.5) / (spread * size)
    zoom_x = np.maximum(sx, 0.5) / (spread * size)
    box = _box(size, GRID)
    rows = box @ _sampling_matrices(cy, zoom_y, size, size)  # (n, 8, size)
    cols = box @ _sampling_matrices(cx, zoom_x, size, size)
    v = (rows @ grey @ cols.transpose(0, 2, 1)).reshape(n, -1)
    v -= v.mean(axis=1, keepdims=True)
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)).astype(np.float32)


def spectrum_embedding(thumbs: np.ndarray, chunk: int = 32768) -> np.ndarray:
    """(N, 276) unit vectors: square roots of the lowest Fourier magnitudes of the band-passed,
    Hann-windowed grey thumbnail, zero mean. Unchanged by a shift; a quarter turn or a mirror
    image turns or mirrors it."""
    if len(thumbs) > chunk:
        return np.concatenate(_threaded(lambda s: spectrum_embedding(thumbs[s : s + chunk], chunk),
                                        list(range(0, len(thumbs), chunk))))
    grey = _grey(thumbs)
    size = grey.shape[1]
    window = np.hanning(size).astype(np.float32)
    from scipy import fft

    magnitude = np.abs(fft.rfft2(grey * (window[:, None] * window[None, :]), workers=-1))
    keep = SPECTRUM_KEEP
    low = np.concatenate([magnitude[:, :keep, :keep], magnitude[:, -keep + 1 :, :keep]], axis=1)
    v = np.sqrt(low * _band_gain(size, keep)).reshape(len(grey), -1)
    v -= v.mean(axis=1, keepdims=True)
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)).astype(np.float32)


def _band_gain(size: int, keep: int) -> np.ndarray:
    """The difference of Gaussians of SPECTRUM_BAND as a gain on the kept frequencies (the
    band-pass applied in the frequency domain, where it is a product)."""
    fy = np.concatenate([np.arange(keep), np.arange(-keep + 1, 0)]) / size
    fx = np.arange(keep) / size
    f2 = fy[:, None] ** 2 + fx[None, :] ** 2
    gain = [np.exp(-2 * np.pi**2 * sigma**2 * f2) for sigma in SPECTRUM_BAND]
    return (gain[0] - gain[1]).astype(np.float32)


def shifted_ncc(a: np.ndarray, b: np.ndarray, max_shift: int) -> np.ndarray:
    """(P,) best NCC of b's centre against a's windows shifted by up to ``max_shift`` px; (P, S, S, C) inputs.

    The correlations at every shift come from one product of Fourier transforms, and each
    window's mean and norm from running sums, so no window is ever copied out (tested against
    a direct computation)."""
    s, size = max_shift, a.shape[1]
    width = size - 2 * s
    a = np.ascontiguousarray(np.moveaxis(np.asarray(a, np.float32), 3, 1))  # (P, C, S, S): FFTs over contiguous axes
    centre = np.moveaxis(np.asarray(b, np.float32), 3, 1)[:, :, s : size - s, s : size - s]
    centre = centre - centre.mean(axis=(1, 2, 3), keepdims=True)
    centre /= np.maximum(np.sqrt((centre**2).sum(axis=(1, 2, 3), keepdims=True)), 1e-6)
    # Channels summed in the frequency domain (the transform is linear): one inverse per pair.
    from scipy import fft

    spectrum = (fft.rfft2(a, workers=-1) * np.conj(fft.rfft2(np.ascontiguousarray(centre), s=(size, size), workers=-1))).sum(axis=1)
    products = fft.irfft2(spectrum, s=(size, size), workers=-1)[:, : 2 * s + 1, : 2 * s + 1]
    count = width * width * a.shape[1]
    sums = []
    for values in (a.sum(axis=1), (a * a).sum(axis=1)):
        running = np.zeros((len(a), size + 1, size + 1), np.float64)
        running[:, 1:, 1:] = values.cumsum(axis=1, dtype=np.float64).cumsum(axis=2)
        sums.append(running[:, width:, width:] - running[:, :-width, width:] - running[:, width:, :-width]
                     + running[:, :-width, :-width])  # (P, 2s+1, 2s+1) window sums
    spread = np.sqrt(np.maximum(sums[1] - sums[0] ** 2 / count, 1e-12))
    return (products / np.maximum(spread, 1e-6)).max(axis=(1, 2)).astype(np.float32)


def _stretch_matrix(size: int, scale: float) -> np.ndarray:
    """(size, size) linear interpolation that stretches one axis by ``scale`` about the centre (edges repeated)."""
    centre = np.array([(size - 1) / 2], np.float32)
    return _sampling_matrices(centre, np.array([1 / scale], np.float32), size, size)[0]


def _scaled(images: np.ndarray, sy: float, sx: float) -> np.ndarray:
    """(P, S, S, C) stretched by sy, sx about the centre: separable linear interpolation, edges repeated
    (``scipy.ndimage.affine_transform`` with ``order=1, mode="nearest"``, as two small matrix products)."""
    if sy == 1.0 and sx == 1.0:
        return images
    size = images.shape[1]
    out = np.asarray(images, np.float32)
    if sy != 1.0:
        out = np.einsum("os,psxc->poxc", _stretch_matrix(size, sy), out)
    if sx != 1.0:
        out = np.einsum("os,pysc->pyoc", _stretch_matrix(size, sx), out)
    return out


def first_look(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """(P,) band-passed NCC of 32 px RGB thumbnail pairs at the best shift of up to 2 px, either way round."""

    def look(start: int) -> np.ndarray:
        pa = band_pass(a[start : start + chunk], FIRST_BAND)
        pb = band_pass(b[start : start + chunk], FIRST_BAND)
        return np.maximum(shifted_ncc(pa, pb, 2), shifted_ncc(pb, pa, 2))

    parts = _threaded(look, list(range(0, len(a), chunk)))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def confirm(a32: np.ndarray, b32: np.ndarray, a64: np.ndarray, b64: np.ndarray, chunk: int = 512) -> np.ndarray:
    """(P,) the confirmation's similarity: b stretched by the per-axis scale that fits best at
    32 px, then the best band-passed NCC at 64 px over shifts of up to 4 px. Chunks run on one
    thread per core (the same values)."""

    def look(start: int) -> np.ndarray:
        part = slice(start, start + chunk)
        pa, pb = np.asarray(a32[part], np.float32), np.asarray(b32[part], np.float32)
        # Band-passed once, then stretched: the two nearly commute for stretches of a few percent.
        band_a, band_b = band_pass(pa, FIRST_BAND), band_pass(pb, FIRST_BAND)
        best = np.full(len(pa), -2.0, np.float32)
        scale = np.zeros((len(pa), 2), np.float32)
        for sy, sx in STRETCHES:
            value = shifted_ncc(band_a, _scaled(band_b, sy, sx), 2)
            better = value > best
            best[better], scale[better] = value[better], (sy, sx)
        fine_a = band_pass(np.asarray(a64[part], np.float32), FINE_BAND)
        fine_b = band_pass(np.asarray(b64[part], np.float32), FINE_BAND)
        result = np.empty(len(pa), np.float32)
        for sy, sx in {tuple(row) for row in scale.tolist()}:
            mask = np.all(scale == (sy, sx), axis=1)
            result[mask] = shifted_ncc(fine_a[mask], _scaled(fine_b[mask], sy, sx), 4)
        return result

    parts = _threaded(look, list(range(0, len(a32), chunk)))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _neighbours(base: np.ndarray, queries: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(len(queries), k) indices of each query's k nearest rows of ``base`` by inner product (-1: none)."""
    import faiss

    n = len(base)
    if n <= EXACT_SEARCH_LIMIT:
        index = faiss.IndexFlatIP(base.shape[1])
    else:  # an inverted file: about 4 sqrt(n) lists, 16 searched per query
        lists = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(base.shape[1]), base.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        index.train(base[rng.choice(n, size=min(n, 40 * lists), replace=False)])
        index.nprobe = 16
    index.add(base)
    return index.search(queries, min(k, n))[1]


def candidate_pairs(thumbs: np.ndarray, k: int, turns: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i != j, and the turn t such that i is among the k nearest of j turned by t
    in layout; with ``turns`` all 8 symmetries, else the image as it is."""
    n = len(thumbs)
    if n < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    base = layout_embedding(thumbs)
    found, found_turn = [], []
    for turn in range(8 if turns else 1):
        queries = base if turn == 0 else layout_embedding(dihedral(thumbs, turn))
        nearest = _neighbours(base, queries, k + 1)
        js = np.repeat(np.arange(n), nearest.shape[1])
        is_ = nearest.ravel().astype(np.int64)
        keep = (is_ >= 0) & (is_ != js)
        found.append(np.stack([is_[keep], js[keep]], axis=1))
        found_turn.append(np.full(int(keep.sum()), turn, np.int64))
    pairs, turn = np.concatenate(found), np.concatenate(found_turn)
    # i < j for turn 0 (either way round is the same pair); a turned pair keeps its direction.
    flip = (turn == 0) & (pairs[:, 0] > pairs[:, 1])
    pairs[flip] = pairs[flip][:, ::-1]
    keyed = np.unique(np.concatenate([pairs, turn[:, None]], axis=1), axis=0)
    return keyed[:, :2], keyed[:, 2]


def _turned(images: np.ndarray, turn: np.ndarray) -> np.ndarray:
    out = np.empty_like(images)
    for t in np.unique(turn):
        mask = turn == t
        out[mask] = dihedral(images[mask], int(t))
    return out


def similar_pairs(thumbs: np.ndarray, fine_thumbs: Callable[[np.ndarray], np.ndarray], *, neighbours: int = 10,
                  spectrum_min: float = 0.95, first_look_min: float = 0.84, threshold: float = 0.9,
                  turns: bool = False) -> SimilarPairs:
    """The near duplicates among ``thumbs`` ((N, 32, 32, 3) uint8), through the four looks.

    ``fine_thumbs(indices)`` returns those images at 64 px ((len, 64, 64, 3)); it is called once,
    for the few images whose pairs reach the confirmation.
    """
    thumbs = np.asarray(thumbs)
    pairs, turn = candidate_pairs(thumbs, neighbours, turns)
    looked = {"candidates": len(pairs)}
    if len(pairs):
        spectra = spectrum_embedding(thumbs)
        keep = np.zeros(len(pairs), bool)
        for t in np.unique(turn):
            rows = np.flatnonzero(turn == t)
            if t == 0:
                turned_spectra, where = spectra, pairs[rows, 1]
            else:  # the turned images' spectra, computed once per image
                involved = np.unique(pairs[rows, 1])
                turned_spectra = spectrum_embedding(dihedral(thumbs[involved], int(t)))
                where = np.searchsorted(involved, pairs[rows, 1])
            for start in range(0, len(rows), 1 << 20):
                part = slice(start, start + (1 << 20))
                cosine = np.einsum("pd,pd->p", spectra[pairs[rows[part], 0]], turned_spectra[where[part]])
                keep[rows[part]] = cosine >= spectrum_min
        pairs, turn = pairs[keep], turn[keep]
    looked["spectrum"] = len(pairs)
    if len(pairs):
        keep = np.zeros(len(pairs), bool)
        for start in range(0, len(pairs), 16384):  # gathered a chunk at a time: memory stays flat
            part = slice(start, start + 16384)
            b = _turned(thumbs[pairs[part, 1]], turn[part])
            keep[part] = first_look(thumbs[pairs[part, 0]], b) >= first_look_min  # band_pass makes them float
        pairs, turn = pairs[keep], turn[keep]
    looked["first_look"] = len(pairs)
    similarity = np.zeros(0, np.float32)
    if len(pairs):
        involved = np.unique(pairs)
        fine = np.asarray(fine_thumbs(involved))
        row = np.searchsorted(involved, pairs)
        similarity = confirm(thumbs[pairs[:, 0]], _turned(thumbs[pairs[:, 1]], turn),
                             fine[row[:, 0]], _turned(fine[row[:, 1]], turn))
        keep = similarity >= threshold
        pairs, turn, similarity = pairs[keep], turn[keep], similarity[keep]
    # One row per pair of images: the best-matching turn.
    order = np.argsort(-similarity, kind="stable")
    pairs, turn, similarity = pairs[order], turn[order], similarity[order]
    _, first = np.unique(np.sort(pairs, axis=1), axis=0, return_index=True)
    first = np.sort(first)
    looked["confirmed"] = len(first)  # pairs of images (a pair found both ways round counts once)
    return SimilarPairs(pairs[first], turn[first], similarity[first], looked)
