"""Shared fixtures: small datasets built by the tests from real PBC originals.

Real images are read from ../shared/data (never copied into the repository);
contaminants and near duplicates are made with bloodcell.synthetic.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The datasets folder: BLOODCELL_DATA, or ../shared/data beside the repository (the Makefile's default).
SHARED = Path(os.environ.get("BLOODCELL_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
ORIGINALS = SHARED / "pbc-originals"
PBC224 = SHARED / "pbc224"
DATA_MISSING = f"PBC data not found at {SHARED} (set BLOODCELL_DATA to the folder holding pbc224/ and pbc-originals/)"
_skips: dict[str, set[str]] = {}  # reason -> test ids


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(DATA_MISSING)
    return path


# Fixtures that train, export or curate a whole dataset: a test that uses one is marked slow.
SLOW_FIXTURES = {"tiny_data", "run", "onnx_model", "curated", "dirty_folder", "mobilenet", "client"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("browser") or item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        _skips.setdefault(reason, set()).add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    """One line per reason a test was skipped, with how many (pytest's -rs lists them per place)."""
    for reason, tests in sorted(_skips.items()):
        terminalreporter.write_line(f"{len(tests)} tests skipped: {reason}")


@pytest.fixture(scope="session")
def original_files() -> list[Path]:
    return sorted(require(ORIGINALS).glob("*/*.jpg"))


@pytest.fixture(scope="session")
def dirty_folder(tmp_path_factory, original_files) -> dict:
    """A class-folder dataset of the 200 real originals (mixed sizes) with known injected problems."""
    from bloodcell.data import synthetic

    root = tmp_path_factory.mktemp("dirty") / "cells"
    rng = np.random.default_rng(7)
    for file in original_files:
        (root / file.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, root / file.parent.name / file.name)
    classes = sorted(p.name for p in root.iterdir())
    truth: dict[str, str] = {}
    # An exact copy inside the same class, and one across classes (a label conflict).
    a, b = original_files[3], original_files[40]
    shutil.copyfile(a, root / a.parent.name / f"copy_{a.name}")
    truth[f"{a.parent.name}/copy_{a.name}"] = "duplicate"
    other = next(c for c in classes if c != b.parent.name)
    shutil.copyfile(b, root / other / f"conflict_{b.name}")
    truth[f"{other}/conflict_{b.name}"] = "label_conflict"
    truth[f"{b.parent.name}/{b.name}"] = "label_conflict"
    # A near copy: re-encoded as JPEG at lower quality.
    c = original_files[80]
    near = synthetic.jpeg_reencode(np.asarray(Image.open(c).convert("RGB")), quality=60)
    Image.fromarray(near).save(root / c.parent.name / f"near_{c.stem}.png")
    truth[f"{c.parent.name}/near_{c.stem}.png"] = "near_duplicate"
    # One non-cell picture repeated 12 times, labels spread over classes.
    photo = synthetic.contaminant("photo", 224, rng)
    for k in range(12):
        name = f"{classes[k % len(classes)]}/repeat_{k}.jpg"
        Image.fromarray(photo).save(root / name, quality=95)
        truth[name] = "outlier"
    # Single odd images.
    for kind in ("noise", "blank", "drawing", "photo"):
        name = f"{classes[0]}/odd_{kind}.png"
        Image.fromarray(synthetic.contaminant(kind, 200, rng)).save(root / name)
        truth[name] = "outlier"
    # Files that cannot be used.
    (root / classes[1] / "empty.jpg").write_bytes(b"")
    (root / classes[1] / "notes.jpg").write_text("not an image")
    data = (root / a.parent.name / a.name).read_bytes()
    (root / classes[2] / "truncated.jpg").write_bytes(data[: len(data) // 3])
    for name in ("empty.jpg", "notes.jpg", "truncated.jpg"):
        truth[f"{classes[1] if name != 'truncated.jpg' else classes[2]}/{name}"] = "unreadable"
    return {"root": root, "truth": truth, "classes": classes}


def tree_digest(root: Path) -> dict[str, tuple[int, float, bytes]]:
    """Every file's size, mtime and content, to prove a folder was not changed."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def whole_fields(root: Path, cells: dict[str, list[Path]], seed: int = 0) -> Path:
    """Class folders of whole fields, one white cell each: every cell image placed somewhere on a field of
    its own median colour at a third of its magnification, 640x480, as a lab photographs fields."""
    from bloodcell.data.fields import fill_colour

    rng = np.random.default_rng(seed)
    for cls, files in cells.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            cell = np.asarray(Image.open(f).convert("RGB"))
            h, w = cell.shape[:2]
            canvas = np.empty((3 * h, 4 * w, 3), np.uint8)
            canvas[:] = fill_colour(cell)
            y, x = int(rng.integers(0, 2 * h)), int(rng.integers(0, 3 * w))
            canvas[y : y + h, x : x + w] = cell
            Image.fromarray(canvas).resize((640, 480), Image.Resampling.BILINEAR).save(root / cls / f"{f.stem}.png")
    return root
