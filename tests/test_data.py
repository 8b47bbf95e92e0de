import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell.data import CLASS_NAMES, BloodcellError, ImageReadError, decode_file, iter_batches, open_source


def save(path, image: Image.Image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)


def test_class_folders_keep_pbc_label_order(tmp_path, rgb):
    for name in ("platelet", "basophil", "lymphocyte"):
        save(tmp_path / name / "a.png", Image.fromarray(rgb))
    source = open_source(tmp_path)
    assert source.class_names == ["basophil", "lymphocyte", "platelet"]
    assert [source.label_name(i.label) for i in source.items] == ["basophil", "lymphocyte", "platelet"]


def test_other_class_names_are_taken_from_the_tree(tmp_path, rgb):
    for name in ("blast", "smudge"):
        save(tmp_path / name / "a.png", Image.fromarray(rgb))
    assert open_source(tmp_path).class_names == ["blast", "smudge"]


def test_every_listed_image_format_is_read_and_other_files_are_not(tmp_path, rgb):
    # WebP too: `benchmarks/sweep.py pack` writes it, and some scanners export it.
    for suffix in (".png", ".jpg", ".tif", ".bmp", ".webp"):
        save(tmp_path / "basophil" / f"a{suffix}", Image.fromarray(rgb), **({"lossless": True} if suffix == ".webp" else {}))
    (tmp_path / "basophil" / "notes.txt").write_text("not an image")
    source = open_source(tmp_path)
    assert sorted(item.path.rsplit(".", 1)[1] for item in source.items) == ["bmp", "jpg", "png", "tif", "webp"]
    decoded, _ = decode_file(tmp_path / "basophil" / "a.webp")
    assert np.array_equal(decoded, rgb)


def test_class_folders_named_another_way_are_read_as_the_given_classes(tmp_path, rgb):
    for folder in ("Neutrophils", "EOS", "immature granulocytes", "band"):
        save(tmp_path / folder / "a.png", Image.fromarray(rgb))
    source = open_source(tmp_path, class_names=list(CLASS_NAMES))
    assert source.class_names == list(CLASS_NAMES)
    labels = {Path(item.path).parent.name: source.label_name(item.label) for item in source.items}
    assert labels == {"Neutrophils": "neutrophil", "EOS": "eosinophil", "immature granulocytes": "ig", "band": "neutrophil"}
    assert source.renamed == labels
    # a dataset's own classes (no class names given) keep their folders' names: band is not merged
    assert sorted(open_source(tmp_path).class_names) == sorted(labels)
    assert open_source(tmp_path).renamed == {}
    # a folder naming no class is still refused
    save(tmp_path / "smudge" / "a.png", Image.fromarray(rgb))
    with pytest.raises(BloodcellError, match="unknown class folder.*smudge"):
        open_source(tmp_path, class_names=list(CLASS_NAMES))


def test_unknown_class_folder_is_named(tmp_path, rgb):
    save(tmp_path / "basophil" / "a.png", Image.fromarray(rgb))
    save(tmp_path / "basofil" / "a.png", Image.fromarray(rgb))
    with pytest.raises(BloodcellError, match="unknown class folder.*basofil.*--skip-unknown"):
        open_source(tmp_path, class_names=list(CLASS_NAMES))


def test_unknown_class_folders_can_be_left_out_and_are_counted(tmp_path, rgb):
    """A lab's set with classes a model does not know (smudge cells, blasts): skip_unknown reads the rest."""
    for path in ("Neutrophils/a.png", "Neutrophils/b.png", "lymphocyte/a.png", "smudge/a.png", "smudge/b.png",
                 "smudge/deeper/c.png", "blast/a.png"):
        save(tmp_path / path, Image.fromarray(rgb))
    source = open_source(tmp_path, class_names=list(CLASS_NAMES), skip_unknown=True)
    assert sorted((Path(i.path).parent.name, source.label_name(i.label)) for i in source.items) == [
        ("Neutrophils", "neutrophil"), ("Neutrophils", "neutrophil"), ("lymphocyte", "lymphocyte")]
    assert source.ignored == {"blast": 1, "smudge": 3}
    assert source.renamed == {"Neutrophils": "neutrophil"}
    # nothing the model knows at all: refused, even when skipping
    only_unknown = tmp_path / "only"
    save(only_unknown / "smudge" / "a.png", Image.fromarray(rgb))
    with pytest.raises(BloodcellError, match="none of its class folders"):
        open_source(only_unknown, class_names=list(CLASS_NAMES), skip_unknown=True)


@pytest.mark.parametrize(
    "mode,note",
    [("L", "mode L"), ("P", "mode P"), ("RGBA", "mode RGBA"), ("CMYK", "mode CMYK"), ("I;16", "scaled")],
)
def test_modes_become_rgb_uint8_with_a_note(tmp_path, rgb, mode, note):
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        path = save(tmp_path / "x.png", image)
    else:
        path = save(tmp_path / ("x.tif" if mode == "CMYK" else "x.png"), Image.fromarray(rgb).convert(mode))
    decoded, conversion = decode_file(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (40, 30, 3)
    assert note in conversion
    if mode == "I;16":
        assert np.array_equal(decoded[..., 0], rgb[..., 0])


def test_exif_orientation_is_honoured(tmp_path, rgb):
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = save(tmp_path / "rotated.jpg", image, exif=exif, quality=95)
    decoded, _ = decode_file(path)
    assert decoded.shape == (30, 40, 3)


@pytest.mark.parametrize(
    "content,reason",
    [(b"", "empty file"), (b"hello, I am text", "not an image"), ("truncated", "truncated")],
)
def test_bad_files_raise_a_readable_reason(tmp_path, rgb, content, reason):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.repeat(np.repeat(rgb, 8, 0), 8, 1)).save(buffer, "JPEG")
        content = buffer.getvalue()[:600]
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason):
        decode_file(path)


def test_pixel_limit_refuses_before_decoding(tmp_path, rgb):
    path = save(tmp_path / "big.png", Image.fromarray(rgb))
    with pytest.raises(ImageReadError, match="over the limit of 1000 pixels"):
        decode_file(path, max_pixels=1000)


def test_course_npz_with_column_labels_and_names(tmp_path, rgb):
    images = np.stack([rgb] * 5)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([[0], [1], [2], [7], [8]]),
             class_names=np.array(["a", "b", "c", "d", "e", "f", "g", "h"]))
    source = open_source(tmp_path / "d.npz")
    assert source.kind == "npz" and source.class_names[0] == "a"
    assert [i.label for i in source.items] == [0, 1, 2, 7]
    assert source.problems[0][0] == 4 and "out of range" in source.problems[0][2]
    batch = next(iter_batches(source))
    assert np.array_equal(batch.images[0], rgb)


def test_medmnist_npz_concatenates_its_splits(tmp_path, rgb):
    np.savez(tmp_path / "blood.npz", train_images=np.stack([rgb] * 3), train_labels=np.zeros((3, 1), int),
             val_images=np.stack([rgb] * 2), val_labels=np.ones((2, 1), int),
             test_images=np.stack([rgb] * 1), test_labels=np.full((1, 1), 7))
    source = open_source(tmp_path / "blood.npz")
    assert source.kind == "medmnist" and source.class_names == list(CLASS_NAMES)
    assert len(source.items) == 6 and source.items[5].path.endswith("test_images[0]")


def test_grayscale_npz_is_converted(tmp_path, rgb):
    np.savez(tmp_path / "g.npz", images=np.stack([rgb[..., 0]] * 2), labels=np.array([0, 1]))
    batch = next(iter_batches(open_source(tmp_path / "g.npz")))
    assert batch.images[0].shape == (40, 30, 3) and batch.conversions["grayscale converted to RGB"] == 2


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"images": np.zeros((2, 4, 4, 5), np.uint8), "labels": np.zeros(2, int)}, "channels"),
        ({"images": np.zeros((2, 4), np.uint8), "labels": np.zeros(2, int)}, "shape"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(3, int)}, "2 images .* but 3 labels"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0.5, 1])}, "integers"),
        ({"pictures": np.zeros((2, 4, 4, 3), np.uint8)}, "expected arrays 'images' and 'labels'"),
    ],
)
def test_wrong_npz_layouts_are_explained(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BloodcellError, match=message):
        open_source(tmp_path / "bad.npz")


def test_iter_batches_lists_failures_and_keeps_going(tmp_path, rgb):
    save(tmp_path / "basophil" / "good.png", Image.fromarray(rgb))
    (tmp_path / "basophil" / "bad.png").write_bytes(b"")
    source = open_source(tmp_path)
    batches = list(iter_batches(source, batch_size=1))
    assert sum(len(b.images) for b in batches) == 1
    failed = [f for b in batches for f in b.failed]
    assert len(failed) == 1 and failed[0][0].path.endswith("bad.png") and "empty" in failed[0][1]


def _object_images(path):
    images = np.empty(2, dtype=object)
    images[0], images[1] = np.zeros((4, 4, 3), np.uint8), "not pixels"
    np.savez(path, images=images, labels=np.array([0, 1]))


def _pickled_labels(path):
    np.savez(path, images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([{"class": 0}, {"class": 1}], dtype=object))


BROKEN_NPZ = {
    "object images": (_object_images, "pickled Python objects"),
    "pickled labels": (_pickled_labels, "pickled Python objects"),
    "float images": (lambda p: np.savez(p, images=np.random.rand(2, 4, 4, 3), labels=np.array([0, 1])), "float64, expected uint8"),
    "wrong shape": (lambda p: np.savez(p, images=np.zeros((2, 4), np.uint8), labels=np.zeros(2, int)), "shape"),
    "lengths differ": (lambda p: np.savez(p, images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(3, int)),
                       "2 images .* but 3 labels"),
    "missing keys": (lambda p: np.savez(p, pictures=np.zeros((2, 4, 4, 3), np.uint8)), "expected arrays 'images' and 'labels'"),
    "not a zip": (lambda p: p.write_bytes(b"this is not a zip archive at all"), "not a readable .npz file"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_NPZ))
def test_every_broken_npz_is_one_line_naming_the_file(tmp_path, kind):
    """From Python: a BloodcellError naming the file. From the CLI: one line, exit 2, no traceback."""
    from typer.testing import CliRunner

    from bloodcell.cli import app

    make, message = BROKEN_NPZ[kind]
    path = tmp_path / "cells.npz"
    make(path)
    with pytest.raises(BloodcellError, match=message) as caught:
        open_source(path)
    assert str(path) in str(caught.value)
    result = CliRunner().invoke(app, ["curate", str(path), "--out", str(tmp_path / "out")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output and "cells.npz" in result.output
