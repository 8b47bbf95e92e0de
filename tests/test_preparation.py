"""The fast preprocessing path: whole-batch localisation and worker processes give exactly the plain answers.

The references below are the straightforward per-image forms (scipy's ndimage and Pillow, one
image at a time), as the framing was first written; the fast path must agree with them bit for bit.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from bloodcell.data import decode_file, preprocess, preprocess_batch
from bloodcell.data.framing import (
    WORK_SIZE,
    CellLocation,
    FramingConfig,
    crop_box,
    dilate,
    locate_cells,
    stain_score,
)
from bloodcell.data.pipeline import Prepared, Preparer, prepare_entries
from bloodcell.data.sources import decode_pil

from .conftest import SHARED, require
from .test_framing import smear

PBC = SHARED / "pbc224"


def reference_locate(image: np.ndarray, min_contrast: float = 15.0) -> CellLocation | None:
    """The localisation one image at a time with scipy's own label statistics and dilation."""
    height, width = image.shape[:2]
    small = np.asarray(Image.fromarray(image).resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR))
    rgb = small.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    score = ndimage.uniform_filter((r + b) / 2 - g + 0.5 * (255 - (r + g + b) / 3), size=3)
    low, high = np.percentile(score, [50, 99.5])
    if high - low < min_contrast:
        return None
    mask = score > low + 0.5 * (high - low)
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    index = np.arange(1, count + 1)
    area = ndimage.sum(mask, labels, index)
    cy, cx = np.array(ndimage.center_of_mass(mask, labels, index)).T
    off_centre = ((cy - WORK_SIZE / 2) ** 2 + (cx - WORK_SIZE / 2) ** 2) / (0.25 * WORK_SIZE) ** 2
    chosen = index[np.argmax(area * np.exp(-off_centre / 2))]
    reach = ndimage.binary_dilation(labels == chosen, iterations=3)
    ys, xs = np.nonzero(np.isin(labels, np.unique(labels[reach & mask])))
    y0, y1 = ys.min() / WORK_SIZE * height, (ys.max() + 1) / WORK_SIZE * height
    x0, x1 = xs.min() / WORK_SIZE * width, (xs.max() + 1) / WORK_SIZE * width
    return CellLocation((y0 + y1) / 2 / height, (x0 + x1) / 2 / width, max(y1 - y0, x1 - x0) / min(height, width))


def reference_preprocess(image: np.ndarray, size: int, framing: dict | None) -> np.ndarray:
    if framing is not None:
        config = FramingConfig.model_validate(framing)
        top, left, side = crop_box(image.shape, reference_locate(image, config.min_contrast), config)
        image = np.ascontiguousarray(image[top : top + side, left : left + side])
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def pbc_images() -> list[np.ndarray]:
    """Every 40th PBC image (385, all classes) and drawn smears of other sizes, a flat image among them."""
    files = sorted(require(PBC).glob("*/*.jpg"))[::40]
    images = [decode_file(f)[0] for f in files]
    drawn = [smear(size=150 + 10 * seed, cell=(40 + 9 * seed, 100 - 7 * seed), seed=seed) for seed in range(6)]
    flat = np.full((90, 120, 3), 200, dtype=np.uint8)
    wide = np.ascontiguousarray(np.concatenate([images[0], images[1]], axis=1))  # 224 x 448
    return images + drawn + [flat, wide]


def test_stain_score_is_the_plain_formula():
    image = np.random.default_rng(0).integers(0, 256, (3, 17, 19, 3), dtype=np.uint8)
    rgb = image.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    assert np.array_equal(stain_score(image), (r + b) / 2 - g + 0.5 * (255 - (r + g + b) / 3))


@pytest.mark.parametrize("seed", range(4))
def test_dilation_matches_scipy(seed):
    masks = np.random.default_rng(seed).random((3, 40, 33)) > 0.93
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    for iterations in (1, 3):
        assert np.array_equal(dilate(masks, iterations), ndimage.binary_dilation(masks, structure, iterations))


def test_batched_localisation_matches_the_per_image_reference(pbc_images):
    found = locate_cells(pbc_images)
    assert found[-2] is None  # the flat image
    for image, location in zip(pbc_images, found):
        reference = reference_locate(image)
        assert (location is None) == (reference is None)
        if reference is not None:
            assert (location.cy, location.cx, location.extent) == pytest.approx(
                (reference.cy, reference.cx, reference.extent), abs=0)
    # The batch does not change an image's answer: alone, or among others.
    assert locate_cells(pbc_images[3:4]) == found[3:4]


@pytest.mark.parametrize("framing", [None, FramingConfig().model_dump(), {"window": 0.5, "margin": 2.0}])
def test_preprocess_batch_matches_the_reference_bit_for_bit(pbc_images, framing):
    batch = preprocess_batch(pbc_images, 64, framing)
    assert batch.shape == (len(pbc_images), 64, 64, 3) and batch.dtype == np.uint8
    for image, prepared in zip(pbc_images, batch):
        assert np.array_equal(prepared, reference_preprocess(image, 64, framing))
    assert np.array_equal(preprocess(pbc_images[5], 64, framing), batch[5])
    # Pillow images in, the same out.
    assert np.array_equal(preprocess_batch([Image.fromarray(im) for im in pbc_images[:20]], 64, framing), batch[:20])


def test_decoding_to_pillow_gives_the_same_pixels(tmp_path):
    image = smear()
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image).convert("P").save(tmp_path / "p.png")
    pil, note = decode_pil(tmp_path / "a.png")
    assert note is None and np.array_equal(np.asarray(pil), image)
    pil, note = decode_pil((tmp_path / "p.png").read_bytes())
    assert note == "mode P converted to RGB" and np.array_equal(np.asarray(pil), decode_file(tmp_path / "p.png")[0])


def test_worker_processes_give_the_in_process_answers_and_name_bad_entries(tmp_path, pbc_images):
    files = []
    for index, image in enumerate(pbc_images[:30]):
        files.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(image).save(files[-1])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(Path(files[0]).read_bytes()[:300])
    entries = [*files[:10], str(tmp_path / "empty.png"), *files[10:20], str(tmp_path / "cut.png"), pbc_images[40],
               Path(files[21]).read_bytes(), *files[22:]]
    framing = FramingConfig().model_dump()
    here = prepare_entries(entries, 48, framing)
    assert [position for position, _ in here.failed] == [10, 21]
    assert "empty file" in here.failed[0][1] and "truncated" in here.failed[1][1]
    assert here.batch.shape == (len(entries) - 2, 3, 48, 48) and here.batch.flags["C_CONTIGUOUS"]
    assert here.kept == [p for p in range(len(entries)) if p not in (10, 21)]
    # A small first chunk: later, larger chunks outgrow its shared slot and come back through the pipe.
    chunks = [entries[:2]] + [entries[i : i + 7] for i in range(2, len(entries), 7)]
    with Preparer(48, framing, workers=2) as preparer:
        # Batches from workers are views of shared-memory slots used in turn: copied as they come.
        pooled = [Prepared(p.batch.copy(), p.kept, p.failed) for p in preparer.map(chunks, ahead=2)]
    assert np.array_equal(np.concatenate([p.batch for p in pooled]), here.batch)
    starts = np.cumsum([0] + [len(chunk) for chunk in chunks])
    assert [int(starts[n]) + p for n, c in enumerate(pooled) for p, _ in c.failed] == [10, 21]
    # The in-process path of the same class agrees too.
    inline = list(Preparer(48, framing, workers=0).map(chunks))
    assert np.array_equal(np.concatenate([p.batch for p in inline]), here.batch)


SCRIPT = """
import sys
from bloodcell.data.pipeline import Preparer
# No `if __name__ == "__main__":` guard: the workers must not run this file again.
with Preparer(32, None, workers=2) as preparer:
    batches = [p.batch.copy() for p in preparer.map([[sys.argv[1]] * 3] * 4)]
print("shapes", sorted({b.shape for b in batches}))
"""


def test_a_script_without_a_main_guard_can_use_workers(tmp_path):
    import subprocess
    import sys

    Image.fromarray(smear()).save(tmp_path / "cell.png")
    (tmp_path / "script.py").write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "cell.png")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "shapes [(3, 3, 32, 32)]"


def test_folder_listing_keeps_the_order_of_sorted_paths(tmp_path):
    from bloodcell.inference.batch import folder_images

    for name in ("a/b.jpg", "a/b/c.png", "a-b/c.jpg", "a/.hidden.jpg", "a/B.JPG", "z.tif", "notes.txt", "a/b/.d/e.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.jpg").mkdir()
    expected = [str(p) for p in sorted(tmp_path.rglob("*")) if p.is_file() and not p.name.startswith(".")
                and p.suffix.lower() in (".jpg", ".png", ".tif")]
    assert folder_images(tmp_path) == expected
    assert str(tmp_path / "a/b/c.png") in expected and str(tmp_path / "a/B.JPG") in expected
