import csv
import json
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from bloodcell import curation as C
from bloodcell.data import BloodcellError

from .conftest import tree_digest


@pytest.fixture(scope="module")
def curated(dirty_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated")
    before = tree_digest(dirty_folder["root"])
    curation = C.curate(dirty_folder["root"], out)
    return {"out": out, "curation": curation, "before": before, **dirty_folder}


def manifest(out):
    with open(out / "manifest.csv") as handle:
        return list(csv.DictReader(handle))


def relative(row, root):
    return row["path"].split(str(root) + "/", 1)[1]


def test_source_is_never_changed(curated):
    assert tree_digest(curated["root"]) == curated["before"]


def test_manifest_has_one_row_per_input_item_in_input_order(curated):
    rows = manifest(curated["out"])
    n_files = sum(1 for p in curated["root"].rglob("*") if p.is_file())
    assert len(rows) == n_files
    assert [int(r["index"]) for r in rows] == list(range(n_files))
    for column in ("index", "path", "label", "group", "status", "reason"):
        assert column in rows[0]
    assert {r["status"] for r in rows} <= set(C.STATUSES)


def test_every_injected_problem_is_found(curated):
    rows = {relative(r, curated["root"]): r for r in manifest(curated["out"])}
    for name, expected in curated["truth"].items():
        assert rows[name]["status"] == expected, (name, rows[name]["status"], rows[name]["reason"])
        assert rows[name]["reason"], name


def test_real_cells_are_kept(curated):
    rows = manifest(curated["out"])
    injected = set(curated["truth"])
    real = [r for r in rows if relative(r, curated["root"]) not in injected]
    # The originals of injected copies are 'keep' as the group's first member.
    wrongly_flagged = [r for r in real if r["status"] not in ("keep",)]
    assert len(wrongly_flagged) <= 1, [(r["path"], r["status"], r["reason"]) for r in wrongly_flagged]


def test_groups_have_one_keeper_and_conflicts_have_none(curated):
    by_group = defaultdict(list)
    for row in manifest(curated["out"]):
        if row["group"]:
            by_group[row["group"]].append(row["status"])
    assert by_group
    for statuses in by_group.values():
        if "label_conflict" in statuses:
            assert set(statuses) == {"label_conflict"}
        elif "outlier" in statuses:
            assert set(statuses) == {"outlier"}
        else:
            assert statuses.count("keep") == 1
            assert set(statuses) <= {"keep", "duplicate", "near_duplicate"}


def test_repeated_contaminant_is_one_group_of_outliers(curated):
    rows = [r for r in manifest(curated["out"]) if "repeat_" in r["path"]]
    assert len(rows) == 12
    assert len({r["group"] for r in rows}) == 1
    assert all(r["status"] == "outlier" for r in rows)
    assert "12 times" in rows[0]["reason"]


def test_cleaned_copy_holds_exactly_the_kept_files_byte_for_byte(curated):
    rows = manifest(curated["out"])
    kept = [r for r in rows if r["status"] == "keep"]
    copied = sorted((curated["out"] / "images").rglob("*.*"))
    assert len(copied) == len(kept)
    for row in kept[:20]:
        target = curated["out"] / "images" / row["split"] / row["label"] / row["path"].rsplit("/", 1)[1]
        assert target.read_bytes() == open(row["path"], "rb").read()


def test_split_is_stratified_and_groups_never_straddle(curated):
    rows = manifest(curated["out"])
    kept = [r for r in rows if r["status"] == "keep"]
    fractions = {s: sum(r["split"] == s for r in kept) / len(kept) for s in C.SPLITS}
    assert abs(fractions["train"] - 0.8) < 0.06 and abs(fractions["test"] - 0.1) < 0.06
    for label in {r["label"] for r in kept}:
        assert any(r["split"] == "train" for r in kept if r["label"] == label)


def test_assign_splits_keeps_groups_whole_and_is_seeded():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, size=2000)
    labels = groups % 4  # a group's members share a label
    config = C.SplitConfig(train=0.7, val=0.15, test=0.15, seed=3)
    splits = C.assign_splits(groups, labels, config)
    for g in np.unique(groups):
        assert len(set(splits[groups == g])) == 1
    assert (C.assign_splits(groups, labels, config) == splits).all()
    other = C.assign_splits(groups, labels, C.SplitConfig(train=0.7, val=0.15, test=0.15, seed=4))
    assert (other != splits).any()
    assert abs(np.mean(splits == "train") - 0.7) < 0.05


def test_class_weights_match_sklearn(curated):
    from sklearn.utils.class_weight import compute_class_weight

    weights = json.loads((curated["out"] / "class_weights.json").read_text())
    train = [r["label"] for r in manifest(curated["out"]) if r["split"] == "train"]
    names = weights["class_names"]
    expected = compute_class_weight("balanced", classes=np.array(names), y=np.array(train))
    assert np.allclose(weights["weights"], expected, atol=1e-5)


def test_report_embeds_its_pictures(curated):
    html = (curated["out"] / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2  # class chart, outlier scores
    assert html.count("data:image/jpeg;base64,") >= 10  # thumbnails of groups and contaminants
    assert "truncated.jpg" in html and "empty file" in html
    assert "src='http" not in html and 'src="http' not in html


def test_npz_input_gives_npz_output(tmp_path, original_files):
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((64, 64))) for f in original_files[:60]])
    labels = np.array([i % 8 for i in range(60)])[:, None]
    images[10] = images[0]
    labels[10] = labels[0]
    images[11] = images[1]
    labels[11] = (labels[1] + 1) % 8  # conflicting labels
    labels[12] = 99  # out of range
    np.savez(tmp_path / "train.npz", images=images, labels=labels)
    out = tmp_path / "out"
    C.curate(tmp_path / "train.npz", out)
    rows = manifest(out)
    assert rows[10]["status"] == "duplicate"
    assert rows[1]["status"] == rows[11]["status"] == "label_conflict"
    assert rows[12]["status"] == "unreadable" and "out of range" in rows[12]["reason"]
    total = 0
    for split in C.SPLITS:
        data = np.load(out / f"{split}.npz")
        assert data["images"].shape[1:] == (64, 64, 3)
        assert len(data["labels"]) == len(data["images"])
        total += len(data["labels"])
        for i, image in zip(data["index"], data["images"]):
            assert (image == images[i]).all()
    assert total == sum(r["status"] == "keep" for r in rows)


def test_output_inside_input_is_refused(dirty_folder):
    with pytest.raises(BloodcellError, match="inside the input"):
        C.curate(dirty_folder["root"], dirty_folder["root"] / "out")


def test_nothing_readable_stops_with_a_clear_message(tmp_path):
    (tmp_path / "cells" / "lymphocyte").mkdir(parents=True)
    (tmp_path / "cells" / "lymphocyte" / "a.jpg").write_bytes(b"")
    (tmp_path / "cells" / "lymphocyte" / "b.png").write_text("hello")
    with pytest.raises(BloodcellError, match="none of the 2 images could be read"):
        C.curate(tmp_path / "cells", tmp_path / "out")


def test_leakage_check_finds_copies_across_datasets(tmp_path, original_files):
    train, test = tmp_path / "train" / "basophil", tmp_path / "test" / "basophil"
    train.mkdir(parents=True)
    test.mkdir(parents=True)
    for f in original_files[:30]:
        (train / f.name).write_bytes(f.read_bytes())
    for f in original_files[30:50]:
        (test / f.name).write_bytes(f.read_bytes())
    (test / "leak_exact.jpg").write_bytes(original_files[5].read_bytes())
    # A flat picture correlates with nothing: identical pixels must leak all the same (by md5).
    Image.new("RGB", (96, 96), (240, 230, 220)).save(train / "flat.png")
    Image.new("RGB", (96, 96), (240, 230, 220)).save(test / "flat_copy.png")
    from bloodcell.data import synthetic

    near = synthetic.jpeg_reencode(np.asarray(Image.open(original_files[6]).convert("RGB")), 70)
    Image.fromarray(near).save(test / "leak_near.png")
    rng = np.random.default_rng(0)
    original = np.asarray(Image.open(original_files[7]).convert("RGB").resize((96, 96), Image.Resampling.BICUBIC))
    Image.fromarray(synthetic.combined_copy(original, rng)).save(test / "leak_combined.png")
    Image.fromarray(synthetic.combined_copy(original, rng, turn=True)).save(test / "leak_turned.png")
    expected = {(original_files[5].name, "leak_exact.jpg", "exact"), (original_files[6].name, "leak_near.png", "near"),
                (original_files[7].name, "leak_combined.png", "near"), ("flat.png", "flat_copy.png", "exact")}
    pairs = C.check_leakage(tmp_path / "train", tmp_path / "test")
    assert {(p["first"].rsplit("/", 1)[1], p["second"].rsplit("/", 1)[1], p["kind"]) for p in pairs} == expected
    assert {p["found_by"] for p in pairs if p["first"].endswith("flat.png")} == {"md5"}
    turned = C.check_leakage(tmp_path / "train", tmp_path / "test", C.CurateConfig(near_turns=True))
    found = {(p["first"].rsplit("/", 1)[1], p["second"].rsplit("/", 1)[1], p["kind"]): p for p in turned}
    assert set(found) == expected | {(original_files[7].name, "leak_turned.png", "near")}
    assert found[(original_files[7].name, "leak_turned.png", "near")]["turn"] > 0
    hashes = C.check_leakage(tmp_path / "train", tmp_path / "test", C.CurateConfig(near_similarity=None))
    assert {(p["first"].rsplit("/", 1)[1], p["second"].rsplit("/", 1)[1], p["kind"]) for p in hashes} <= expected


@pytest.mark.browser
def test_report_renders_in_a_browser(curated):
    from .browser import broken_images, open_page

    with open_page((curated["out"] / "report.html").as_uri()) as (page, errors):
        assert page.title() == "bloodcell curation report"
        assert page.evaluate("document.images.length") >= 12
        assert broken_images(page) == []
        assert errors == []
