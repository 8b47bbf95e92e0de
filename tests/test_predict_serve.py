"""Prediction, ONNX export, the HTTP API and the web page, on a tiny trained model."""

import io
import json
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from bloodcell.cli import app as cli
from bloodcell.data import BloodcellError
from bloodcell.inference import differential_count, load_predictor, predict_paths
from bloodcell.inference.export import export_onnx
from bloodcell.service.app import create_app
from bloodcell.training import TrainConfig, train

from .conftest import whole_fields
from .test_train import make_tiny_data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = make_tiny_data(root / "data")
    config = TrainConfig(data=data, out=root / "run", model="cnn", image_size=32, batch_size=32,
                         phases=[{"name": "t", "epochs": 2, "lr": 3e-3}], cnn={"channels": [16, 32], "convs_per_block": 1},
                         framing={"window": 0.7})  # so that every path below goes through the framing step
    train(config, log=lambda line: None)
    return {"run": root / "run", "data": data, "root": root}


@pytest.fixture(scope="module")
def cells(original_files):
    return [np.asarray(Image.open(f).convert("RGB")) for f in original_files[:12]]


@pytest.fixture(scope="module")
def onnx_model(run, cells, original_files):
    labels = [f.parent.name for f in original_files[:12]]
    report = export_onnx(run["run"], run["root"] / "model.onnx", cells, quantize=True, check_labels=labels)
    return report


def test_framing_travels_with_the_model(onnx_model, run, cells):
    """The framing a model was trained with is in its contract, and every predictor applies it."""
    from bloodcell.data import preprocess

    framing = json.loads((run["run"] / "model.json").read_text())["framing"]
    assert framing["window"] == 0.7
    for predictor in (load_predictor(onnx_model["onnx"]), load_predictor(run["run"])):
        assert predictor.framing == framing
        prepared = predictor.prepare(cells[0])
        assert np.array_equal(prepared, preprocess(cells[0], 32, framing))
        assert not np.array_equal(prepared, preprocess(cells[0], 32))


def test_onnx_agrees_with_pytorch_and_carries_its_contract(onnx_model, run, cells):
    assert onnx_model["max_prob_diff"] < 1e-4
    assert onnx_model["checked_images"] == 12
    predictor = load_predictor(onnx_model["onnx"])
    assert predictor.backend == "onnxruntime"
    assert predictor.image_size == 32 and len(predictor.class_names) == 8
    meta = json.loads((run["run"] / "model.json").read_text())
    assert predictor.temperature == pytest.approx(meta["temperature"])
    # Dynamic batch axis: 1 and 7 images.
    assert predictor.probabilities(cells[:1]).shape == (1, 8)
    assert predictor.probabilities(cells[:7]).sum(1) == pytest.approx(np.ones(7), abs=1e-5)


def test_int8_model_is_written_and_measured(onnx_model):
    # Only the fully connected layers are quantised: predictions must barely move.
    assert onnx_model["int8_agreement"] >= 0.9
    # Weights are unsigned (U8U8): no CPU's u8s8 kernel can saturate, so the answers are the same on AVX2,
    # AVX-512 and VNNI machines (ONNX Runtime's quantization guide).
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(onnx_model["onnx_int8"]).graph
    quantized = [numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_quantized")]
    assert quantized and all(w.dtype == np.uint8 for w in quantized)
    assert onnx_model["int8_max_prob_diff"] < 0.2
    # The accuracy change of int8 is measured on the labelled check images.
    assert onnx_model["int8_accuracy_change"] == pytest.approx(onnx_model["accuracy_int8"] - onnx_model["accuracy_onnx"])
    assert load_predictor(onnx_model["onnx_int8"]).backend == "onnxruntime"


@pytest.mark.slow
def test_same_padding_is_frozen_and_merged_without_changing_outputs(tmp_path):
    """timm's run-time TF 'SAME' padding becomes Conv pads in the ONNX graph; logits do not move."""
    import onnx
    import timm
    import torch

    from bloodcell.models import Classifier, freeze_same_padding
    from bloodcell.inference import ParallelRunner, onnx_session
    from bloodcell.inference.export import fuse_zero_padding

    torch.manual_seed(0)
    net = Classifier(timm.create_model("tf_mobilenetv3_small_100", num_classes=8), (0.5,) * 3, (0.25,) * 3).eval()
    images = torch.randint(0, 256, (40, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        before = net(images)
        assert freeze_same_padding(net, 64) == 5
        after = net(images)
    assert torch.allclose(before, after, atol=1e-5)
    traced = tmp_path / "traced.onnx"
    torch.onnx.export(net, (images[:1],), str(traced), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}}, opset_version=17, dynamo=False)
    model, merged = fuse_zero_padding(traced, tmp_path / "folded.onnx")
    assert merged == 5
    onnx.save(model, str(tmp_path / "fused.onnx"))
    graph = model.graph
    assert not [node for node in graph.node if node.op_type == "Pad"]
    assert any(list(a.ints) == [0, 0, 1, 1] for node in graph.node if node.op_type == "Conv" for a in node.attribute
               if a.name == "pads")  # asymmetric: nothing before, one pixel after, as TensorFlow pads
    # 40 images run as chunks on parallel threads come back whole and in order.
    runner = ParallelRunner(onnx_session(tmp_path / "fused.onnx"), chunk=16)
    logits = runner(images.numpy())
    assert logits.shape == (40, 8)
    assert np.abs(logits - before.numpy()).max() < 1e-3


@pytest.mark.slow
def test_static_int8_is_calibrated_and_scored_on_different_images(run, original_files, tmp_path):
    files = original_files[:24]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    labels = [f.parent.name for f in files]
    report = export_onnx(run["run"], tmp_path / "model.onnx", images, quantize="static", check_labels=labels)
    assert report["int8_mode"] == "static" and report["int8_checked_images"] == 12  # the half not calibrated on
    import onnx

    ops = {node.op_type for node in onnx.load(report["onnx_int8"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert 0 <= report["int8_agreement"] <= 1 and "int8_accuracy_change" in report
    assert load_predictor(report["onnx_int8"]).probabilities(images[:3]).shape == (3, 8)
    with pytest.raises(BloodcellError, match="calibration images"):
        export_onnx(run["run"], tmp_path / "again.onnx", images[:4], quantize="static")
    with pytest.raises(BloodcellError, match="use 'dynamic' or 'static'"):
        export_onnx(run["run"], tmp_path / "again.onnx", images[:4], quantize="fp4")


def test_predict_folder_skips_bad_files_and_counts(onnx_model, original_files, tmp_path):
    folder = tmp_path / "smear"
    (folder / "sub").mkdir(parents=True)
    for f in original_files[:5]:
        (folder / "sub" / f.name).write_bytes(f.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    predictor = load_predictor(onnx_model["onnx"])
    rows, bad = predict_paths(predictor, [folder], batch_size=2)
    assert len(rows) == 5 and [b[0].endswith("broken.jpg") for b in bad] == [True]
    for row in rows:
        assert sum(row[c] for c in predictor.class_names) == pytest.approx(1, abs=1e-4)
    counts = differential_count(rows, include_abstained=True)
    white = counts["white_cells"]
    if white:
        assert sum(counts["white_cell_percent"].values()) == pytest.approx(100, abs=0.5)
    assert white + counts["platelets"] + counts["erythroblasts"] == 5


def test_predict_command(onnx_model, original_files, tmp_path):
    runner = CliRunner()
    out = tmp_path / "preds.csv"
    result = runner.invoke(cli, ["predict", str(original_files[0]), str(tmp_path / "missing.jpg"),
                                 "--model", onnx_model["onnx"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    header = out.read_text().splitlines()[0].split(",")
    assert header[:6] == ["path", "pred", "confidence", "abstained", "ood_score", "out_of_distribution"]
    assert len(header) == 14
    assert "missing.jpg" in result.output and "Differential count" in result.output
    assert "skipped " in result.output and "[yellow]" not in result.output  # styled, not raw markup
    nothing = runner.invoke(cli, ["predict", str(tmp_path / "missing.jpg"), "--model", onnx_model["onnx"]])
    assert nothing.exit_code == 2 and "no image could be read" in nothing.output
    # Two decoding processes, asked for: the same file written.
    again = runner.invoke(cli, ["predict", str(original_files[0]), "--model", onnx_model["onnx"], "--out",
                                str(tmp_path / "again.csv"), "--workers", "2"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again.csv").read_text().splitlines()[1] == out.read_text().splitlines()[1]


def test_predict_sorts_copies_for_review_and_adapt_reads_the_sorted_folder(onnx_model, original_files, tmp_path):
    """`predict --sort-into DIR`: each image copied (never moved) into DIR/<class>/ or DIR/to_check/, a name
    taken twice numbered, an .npz array written as PNG; the sorted folder is what adapt --data reads."""
    import csv

    from bloodcell.core.classes import CLASS_NAMES
    from bloodcell.workflows.adapt import load_labelled

    folder = tmp_path / "cells"
    for sub, files in (("a", original_files[:4]), ("b", original_files[:2])):  # b repeats two of a's names
        (folder / sub).mkdir(parents=True)
        for f in files:
            (folder / sub / f.name).write_bytes(f.read_bytes())
    arrays = tmp_path / "more.npz"
    np.savez(arrays, images=np.stack([np.asarray(Image.open(f).convert("RGB").resize((64, 64))) for f in original_files[4:6]]),
             labels=np.zeros(2, np.int64))
    before = sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*"))
    review = tmp_path / "review"
    result = CliRunner().invoke(cli, ["predict", str(folder), str(arrays), "--model", onnx_model["onnx"],
                                      "--out", str(tmp_path / "p.csv"), "--sort-into", str(review)])
    assert result.exit_code == 0, result.output
    assert sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*")) == before  # copies, the input untouched
    rows = list(csv.DictReader((tmp_path / "p.csv").read_text().splitlines()))
    expected = {}
    for row in rows:
        to_check = row["abstained"] == "True" or row["out_of_distribution"] == "True"
        key = "to_check" if to_check else row["pred"]
        expected[key] = expected.get(key, 0) + 1
    copied = {d.name: len(list(d.iterdir())) for d in review.iterdir()}
    assert copied == expected and sum(copied.values()) == 8
    names = sorted(p.name for p in review.rglob("*") if p.is_file())
    assert sum(n.endswith(".png") and "images" in n for n in names) == 2
    assert len(set(names)) == 8  # the repeated names were numbered, nothing overwritten
    assert "bloodcell adapt --data" in " ".join(result.output.split())
    # Reviewed: every cell to check but one sorted into a class folder; adapt reads the rest and says so.
    to_check = review / "to_check"
    to_check.mkdir(exist_ok=True)
    if not any(to_check.iterdir()):
        next(p for p in review.rglob("*") if p.is_file()).rename(to_check / "unsure.png")
    (review / "neutrophil").mkdir(exist_ok=True)
    for file in sorted(to_check.iterdir())[1:]:
        file.rename(review / "neutrophil" / file.name)
    lines = []
    labels = load_labelled(review, list(CLASS_NAMES), 32, None, lines.append).labels
    assert len(labels) == 7 and "to_check/: 1 cell(s) not sorted into a class folder, left out" in lines


def test_out_of_distribution_scores_travel_with_the_model(run, onnx_model, cells):
    """Training stores the training lab's statistics; ONNX (float and int8) scores as PyTorch does."""
    contract = json.loads((run["run"] / "model.json").read_text())
    assert contract["shift"]["method"] == "mahalanobis" and (run["run"] / "shift.safetensors").is_file()
    assert onnx_model["outputs"] == ["logits", "ood_score"]
    # Training also fits how fast confidence falls with the score; the ONNX file carries it too.
    assert contract["ood_temperature"] >= 0
    assert load_predictor(onnx_model["onnx"]).contract.ood_temperature == contract["ood_temperature"]
    torch_probs, torch_scores = load_predictor(run["run"]).scores(cells)
    for path in (onnx_model["onnx"], onnx_model["onnx_int8"]):
        probs, scores = load_predictor(path).scores(cells)
        assert scores.shape == (len(cells),) and np.all(scores >= 0)
        np.testing.assert_allclose(scores, torch_scores, rtol=0.02, atol=0.02)
    # Colour-inverted cells are nothing like the training images: they score higher.
    _, inverted = load_predictor(onnx_model["onnx"]).scores([255 - c for c in cells])
    assert np.median(inverted) > np.median(torch_scores)


def test_cells_to_check_stay_out_of_the_differential():
    from bloodcell.inference import prediction_row, shift_summary

    names = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    sure = np.eye(8)[6] * 0.95 + 0.05 / 8
    rows = [prediction_row("a", sure, names, 0.7, 0.4), prediction_row("b", sure, names, 0.7, 3.0),
            prediction_row("c", np.full(8, 1 / 8), names, 0.7, 0.2)]
    assert [r["out_of_distribution"] for r in rows] == [False, True, False]
    counts = differential_count(rows)
    assert counts["white_cells"] == 1 and counts["to_check"] == 2 and counts["out_of_distribution"] == 1
    # p_value: one or more of three beyond the threshold at the training lab's 2%: 1 - 0.98^3
    assert shift_summary(rows) == {"flagged": False, "images_flagged": 1, "images": 3, "score": 0.4, "p_value": 0.0588}
    assert differential_count(rows, include_abstained=True)["white_cells"] == 3


def test_a_differentials_intervals_are_the_exact_binomial_ones_of_rumkes_table():
    """Each percentage's 95% interval from counting alone: scipy's exact (Clopper-Pearson) interval, and
    Rümke's table for a 100-cell count (0% -> 0-4, 10% -> 5-18, 50% -> 40-60, in whole percent)."""
    from scipy.stats import binomtest

    from bloodcell.inference.batch import percent_intervals

    for total in (1, 2, 7, 40, 100, 200, 1000):
        counts = sorted({0, 1, total // 10, total // 2, total - 1, total})
        for count, interval in zip(counts, percent_intervals(counts, total)):
            reference = binomtest(count, total).proportion_ci(confidence_level=0.95, method="exact")
            assert interval == [round(100 * reference.low, 1), round(100 * reference.high, 1)]
            assert interval[0] <= 100 * count / total <= interval[1]
    assert [[round(v) for v in i] for i in percent_intervals([0, 10, 50], 100)] == [[0, 4], [5, 18], [40, 60]]
    assert percent_intervals([3], 0) == [None]
    narrow, wide = percent_intervals([40, 10], 400)[0], percent_intervals([10], 100)[0]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]  # four times the cells, about half the width
    rows = [{"pred": p, "abstained": False} for p in ["neutrophil"] * 6 + ["lymphocyte"] * 4]
    counts = differential_count(rows)
    assert counts["white_cell_percent_95"]["neutrophil"] == percent_intervals([6], 10)[0]
    assert counts["white_cell_percent_95"]["basophil"][0] == 0.0
    assert differential_count([])["white_cell_percent_95"]["neutrophil"] is None


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(BloodcellError, match="model not found"):
        load_predictor(tmp_path / "nope.onnx")


def test_grad_cam_shape_range_and_target(run, cells):
    from bloodcell.data import preprocess
    from bloodcell.inference.explain import grad_cam

    predictor = load_predictor(run["run"])
    image = preprocess(cells[0], 32)
    cam, target = grad_cam(predictor.torch_model, image)
    assert cam.shape == (32, 32) and cam.min() >= 0 and cam.max() == pytest.approx(1)
    other, other_target = grad_cam(predictor.torch_model, image, target=(target + 1) % 8)
    assert other_target != target


# ---------------------------------------------------------------- the service


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(onnx_model):
    return TestClient(create_app(onnx_model["onnx"], max_upload_bytes=2_000_000, max_pixels=500_000))


def test_health_and_model(client):
    assert client.get("/v1/health").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["input_size"] == 32 and len(info["classes"]) == 8 and info["backend"] == "onnxruntime"
    assert info["framing"]["window"] == 0.7  # what the service does to an image before the model


def test_predict_many_images(client, cells):
    files = [("files", (f"cell{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(cells[:3])]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200
    body = response.json()
    assert [r["file"] for r in body["results"]] == ["cell0.png", "cell1.png", "cell2.png"]
    for r in body["results"]:
        assert r["class"] in r["probabilities"] and 0 < r["confidence"] <= 1
    assert "white_cell_percent" in body["differential"]
    assert all(r["out_of_distribution"] == (r["ood_score"] > 1) for r in body["results"])
    assert body["domain_shift"]["images"] == 3 and isinstance(body["domain_shift"]["flagged"], bool)


def test_a_mixed_batch_answers_for_each_file(client, cells):
    files = [("files", ("good0.png", png_bytes(cells[0]), "image/png")),
             ("files", ("broken.png", b"\x89PNG but cut short", "image/png")),
             ("files", ("good1.png", png_bytes(cells[1]), "image/png"))]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200
    body = response.json()
    assert [(r["index"], r["file"]) for r in body["results"]] == [(0, "good0.png"), (2, "good1.png")]
    assert [(e["index"], e["file"]) for e in body["errors"]] == [(1, "broken.png")] and body["errors"][0]["error"]
    alone = client.post("/v1/predict", files=[files[0]]).json()["results"][0]
    assert alone["probabilities"] == body["results"][0]["probabilities"]  # the bad file changes nothing for the good
    nothing = client.post("/v1/predict", files=[files[1], ("files", ("empty.png", b"", "image/png"))])
    assert nothing.status_code == 422 and [e["file"] for e in nothing.json()["errors"]] == ["broken.png", "empty.png"]


def test_api_key_guards_the_api_but_not_health(onnx_model, cells, monkeypatch):
    monkeypatch.delenv("BLOODCELL_API_KEY", raising=False)
    guarded = TestClient(create_app(onnx_model["onnx"], api_key="s3cret"))
    image = [("files", ("a.png", png_bytes(cells[0]), "image/png"))]
    assert guarded.get("/v1/health").status_code == 200
    assert guarded.get("/").status_code == 200  # the page itself asks for the key
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": "s3cret-and-more"}):
        assert guarded.post("/v1/predict", files=image, headers=headers).status_code == 401
        assert guarded.get("/v1/model", headers=headers).status_code == 401
    assert guarded.post("/v1/predict", files=image, headers={"X-API-Key": "s3cret"}).status_code == 200
    monkeypatch.setenv("BLOODCELL_API_KEY", "from-env")
    from_env = TestClient(create_app(onnx_model["onnx"]))
    assert from_env.get("/v1/model").status_code == 401
    assert from_env.get("/v1/model", headers={"X-API-Key": "from-env"}).status_code == 200


@pytest.mark.parametrize("host,key,warned", [("0.0.0.0", None, True), ("192.0.2.7", None, True),
                                              ("0.0.0.0", "k", False), ("127.0.0.1", None, False), ("localhost", None, False)])
def test_serving_beyond_loopback_without_a_key_warns(onnx_model, monkeypatch, host, key, warned):
    import uvicorn

    from bloodcell.service.app import serve

    monkeypatch.delenv("BLOODCELL_API_KEY", raising=False)
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(kwargs))
    warnings = []
    serve(onnx_model["onnx"], host=host, port=1, api_key=key, warn=warnings.append)
    assert started and started[0]["host"] == host
    assert bool(warnings) == warned and (not warned or "API key" in warnings[0])


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    import sys

    from typer.testing import CliRunner

    from bloodcell.cli import app
    from bloodcell.core.errors import MissingExtraError
    from bloodcell.core.extras import require

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the 'serve' extra were not installed
    monkeypatch.delitem(sys.modules, "bloodcell.service.app", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'bloodcell\[serve\]'"):
        require("fastapi", "bloodcell serve")
    result = CliRunner().invoke(app, ["serve"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "'serve' extra" in lines[0], result.output


def test_content_is_checked_by_decoding_not_extension(client):
    response = client.post("/v1/predict", files=[("files", ("cell.png", b"GIF89a but not really", "image/png"))])
    assert response.status_code == 422
    assert response.json()["file"] == "cell.png" and "not an image" in response.json()["error"]


def test_oversized_upload_is_413(client):
    big = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    response = client.post("/v1/predict", files=[("files", ("big.png", png_bytes(big), "image/png"))])
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_too_many_pixels_is_422(client):
    wide = np.zeros((100, 6000, 3), dtype=np.uint8)  # compresses small, decodes large
    response = client.post("/v1/predict", files=[("files", ("wide.png", png_bytes(wide), "image/png"))])
    assert response.status_code == 422 and "pixels" in response.json()["error"]


def test_explain_needs_pytorch_and_works_with_it(client, run, cells):
    assert client.post("/v1/explain", files={"file": ("a.png", png_bytes(cells[0]), "image/png")}).status_code == 422
    torch_client = TestClient(create_app(run["run"]))
    response = torch_client.post("/v1/explain", files={"file": ("a.png", png_bytes(cells[0]), "image/png")})
    assert response.status_code == 200
    import base64

    overlay = Image.open(io.BytesIO(base64.b64decode(response.json()["overlay_png_base64"])))
    assert overlay.size == (224, 224)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(app):
    """Run ``app`` with uvicorn on a free loopback port in a thread; yield its URL, stop it after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def downloaded_csv(page, path) -> list[str]:
    """Click the page's CSV download and return the file's lines."""
    with page.expect_download() as download_info:
        page.click("#download")
    download_info.value.save_as(path)
    return path.read_text().splitlines()


@pytest.mark.browser
def test_web_page_end_to_end_in_a_browser(onnx_model, original_files, tmp_path):
    from scipy.special import betaincinv

    from .browser import open_page

    with serving(create_app(onnx_model["onnx"])) as url, open_page(url) as (page, errors):
        page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"\xff\xd8 not a whole JPEG")
        page.set_input_files("#files", [str(original_files[0]), str(broken), str(original_files[1])])
        page.wait_for_selector(".card .pred b", timeout=20000)
        assert "broken.jpg" in page.inner_text("#errors")  # the bad file is named, the good ones classified
        predicted = page.inner_text(".card .pred b")
        classes = json.loads(page.evaluate("JSON.stringify(classes)"))
        assert predicted in classes
        assert page.locator(".card").count() == 2
        assert "% of white cells" in page.inner_text("#differential")
        assert "95% interval" in page.inner_text("#differential")
        # the page's own exact binomial intervals (both tables) are SciPy's, as the CLI's and the API's are
        grid = [(k, n) for n in (1, 7, 100, 517, 5000) for k in sorted({0, 1, n // 3, n - 1, n})]
        shown = json.loads(page.evaluate(f"JSON.stringify({json.dumps(grid)}.map(([k, n]) => clopperPearson(k, n)))"))
        for (k, n), (low, high) in zip(grid, shown):
            assert low == pytest.approx(betaincinv(k, n - k + 1, 0.025) if k else 0.0, abs=1e-9)
            assert high == pytest.approx(betaincinv(k + 1, n - k, 0.975) if k < n else 1.0, abs=1e-9)
        assert page.evaluate("intervalText(10, 100)") == "4.9–17.6%" and page.evaluate("intervalText(0, 0)") == ""
        # the page's batch verdict is the service's (bloodcell.models.ood.batch_shift), its binomial tail SciPy's
        from scipy.stats import binom

        from bloodcell.models.ood import batch_shift

        cases = [(k, n) for n in (1, 5, 50, 300, 2000) for k in sorted({0, 1, n // 20, n // 10, n // 3, n})]
        tails = json.loads(page.evaluate(f"JSON.stringify({json.dumps(cases)}.map(([k, n]) => binomialTail(k, n, 0.02)))"))
        for (k, n), tail in zip(cases, tails):
            assert tail == pytest.approx(binom.sf(k - 1, n, 0.02), rel=1e-6, abs=1e-12)
        rng = np.random.default_rng(0)
        for share in (0.0, 0.01, 0.05, 0.1, 0.3, 0.6):
            scores = np.where(rng.random(200) < share, rng.uniform(1.1, 2, 200), rng.uniform(0.1, 0.9, 200))
            assert page.evaluate(f"shiftFlagged({json.dumps(scores.tolist())})") is batch_shift(scores)["flagged"], share
        lines = downloaded_csv(page, tmp_path / "download.csv")
        assert lines[0].startswith("file,class,confidence,abstained") and len(lines) == 3
        assert original_files[0].name in lines[1]
        assert errors == []


@pytest.mark.browser
def test_web_page_warns_when_images_are_unlike_the_training_lab(run, original_files, tmp_path):
    """A model whose threshold every image exceeds: the banner shows, cells go to 'to check', the CSV says why."""
    import shutil

    from bloodcell.models import load_shift_head, save_shift_head

    from .browser import open_page

    strict = tmp_path / "strict"
    shutil.copytree(run["run"], strict)
    head = load_shift_head(strict)
    head.threshold.fill_(1e-12)
    save_shift_head(strict, head, {})
    with serving(create_app(strict)) as url, open_page(url) as (page, errors):
        page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
        assert page.locator("#shift").is_hidden()
        page.set_input_files("#files", [str(original_files[0]), str(original_files[1])])
        page.wait_for_selector("#shift", state="visible", timeout=20000)
        assert "do not look like the lab the model was trained on" in page.inner_text("#shift")
        assert page.locator(".card", has_text="unfamiliar").count() == 2
        assert "to check\t2" in page.inner_text("#differential")
        lines = downloaded_csv(page, tmp_path / "download.csv")
        assert lines[0].startswith("file,class,confidence,abstained,ood_score,out_of_distribution")
        assert all(line.split(",")[5] == "true" for line in lines[1:])
        assert errors == []


@pytest.mark.slow
def test_default_model_predicts_and_looks_at_the_cell(original_files):
    """The shipped model: Grad-CAM is higher on the stained cell than on the background for most real images."""
    from bloodcell.inference.explain import focus_on_cell, grad_cam
    from bloodcell.inference import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "model.onnx").is_file():
        pytest.skip("no default model in this checkout")
    onnx_predictor = load_predictor("default")
    torch_predictor = load_predictor(DEFAULT_MODEL_DIR)
    images = [np.asarray(Image.open(f).convert("RGB")) for f in original_files[::5]]
    assert np.abs(onnx_predictor.probabilities(images) - torch_predictor.probabilities(images)).max() < 1e-4
    model = torch_predictor.torch_model
    hits = []
    for image in images:
        small = torch_predictor.prepare(image)  # framed as the model sees it, as the service explains it
        cam, _ = grad_cam(model, small)
        hits.append(focus_on_cell(cam, small))
    rate = float(np.mean(hits))
    print(f"Grad-CAM on the stained cell for {rate:.0%} of {len(hits)} real images")
    assert rate > 0.5


def test_prediction_on_worker_processes_matches_in_process(onnx_model, cells, tmp_path):
    """Files, an .npz and a broken file: the same rows and the same refusals with or without workers."""
    folder = tmp_path / "cells"
    folder.mkdir()
    for index in range(21):
        Image.fromarray(cells[index % len(cells)][index:, :]).save(folder / f"cell{index:02d}.png")
    (folder / "cell05.png").write_bytes(b"\x89PNG cut short")
    for index in range(4):  # a whole chunk of unreadable files
        (folder / f"bad{index}.png").write_bytes(b"not an image")
    np.savez(tmp_path / "more.npz", images=np.stack([c[:200, :200] for c in cells[:5]]), labels=np.zeros(5, int))
    predictor = load_predictor(onnx_model["onnx"])
    inputs = [folder, tmp_path / "more.npz"]
    here, refused_here = predict_paths(predictor, inputs, batch_size=4, workers=0)
    pooled, refused_pooled = predict_paths(predictor, inputs, batch_size=4, workers=2)
    assert len(here) == 25
    assert [path for path, _ in refused_here] == [str(folder / f"bad{i}.png") for i in range(4)] + [str(folder / "cell05.png")]
    assert pooled == here and refused_pooled == refused_here
    alone = predictor.scores([np.asarray(Image.open(folder / "cell07.png"))])[0][0]
    assert here[6]["pred"] == predictor.class_names[int(alone.argmax())]


def test_the_batcher_gathers_concurrent_requests_into_one_network_call():
    from concurrent.futures import ThreadPoolExecutor

    from bloodcell.service.batcher import DynamicBatcher

    calls = []

    def score(batch):
        calls.append(len(batch))
        time.sleep(0.02)  # a network call long enough for requests to queue behind it
        return batch.reshape(len(batch), -1)[:, :3].astype(np.float32), batch[:, 0, 0, 0].astype(np.float32)

    batcher = DynamicBatcher(score, max_batch=16, window_s=0.05)
    requests = [np.full((1 + n % 3, 3, 2, 2), n, dtype=np.uint8) for n in range(12)]
    for _ in requests:
        batcher.expect()
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda batch: batcher.submit(batch).result(timeout=10), requests))
    for batch, (probs, ood) in zip(requests, answers):  # each request gets its own rows back
        assert len(probs) == len(batch) and np.all(probs == batch[0, 0, 0, 0]) and np.all(ood == batch[0, 0, 0, 0])
    assert sum(calls) == sum(len(b) for b in requests) and max(calls) <= 16
    assert len(calls) < len(requests) / 2
    # Alone, a request is not held back for the window.
    start = time.perf_counter()
    batcher.submit(requests[0], expected=False).result(timeout=10)
    assert time.perf_counter() - start < 0.045
    # A failing network call fails its requests, and the batcher goes on.
    broken = DynamicBatcher(lambda batch: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        broken.submit(requests[0], expected=False).result(timeout=10)
    with pytest.raises(ZeroDivisionError):
        broken.submit(requests[1], expected=False).result(timeout=10)


def test_the_service_answers_concurrent_clients_as_it_answers_one(onnx_model, cells):
    """Real HTTP, 8 clients at once: every answer equals the one-at-a-time answer for its image."""
    import httpx

    app = create_app(onnx_model["onnx"], prep_workers=2, batch_window_ms=20)
    images = [png_bytes(image) for image in cells[:8]]
    with serving(app) as url:
        def ask(index):
            with httpx.Client(timeout=30) as client:
                files = [("files", (f"c{index}.png", images[index], "image/png"))]
                return client.post(url + "v1/predict", files=files).json()["results"][0]["probabilities"]

        alone = [ask(index) for index in range(8)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, list(range(8)) * 3))
    for index, probabilities in enumerate(together):
        assert probabilities == pytest.approx(alone[index % 8], abs=1e-5)
    assert app.state.batcher.images == 8 + 24 and app.state.batcher.batches < 8 + 24  # some calls held several


def test_the_service_starts_its_decoding_workers_with_itself_and_stops_them(onnx_model, cells):
    app = create_app(onnx_model["onnx"], prep_workers=1, detector=None)
    with TestClient(app) as client:  # start-up and shut-down run
        workers = list(app.state.preparer._workers)
        assert len(workers) == 1 and workers[0].process.is_alive()  # before any request
        files = [("files", ("c.png", png_bytes(cells[0]), "image/png"))]
        assert client.post("/v1/predict", files=files).status_code == 200
        assert app.state.preparer._workers == workers  # the same worker answered
    assert not workers[0].process.is_alive()


def test_serve_with_several_server_processes(onnx_model, cells, tmp_path):
    import subprocess
    import sys

    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bloodcell", "serve", "--model", str(onnx_model["onnx"]),
                               "--port", str(port), "--workers", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, url = time.time() + 90, f"http://127.0.0.1:{port}"
        while time.time() < deadline:
            try:
                if httpx.get(url + "/v1/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        files = [("files", ("a.png", png_bytes(cells[0]), "image/png"))]
        answers = [httpx.post(url + "/v1/predict", files=files, timeout=30) for _ in range(6)]
        assert all(a.status_code == 200 for a in answers)
        assert len({json.dumps(a.json()["results"][0]["probabilities"]) for a in answers}) == 1
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert output.count("Started server process") == 2, output[-3000:]


def test_predict_says_when_its_images_are_whole_fields(original_files, tmp_path):
    """Crops: no word about fields. Whole fields (a cell off centre among red cells): a warning naming count."""
    from bloodcell.inference.detect import load_detector

    try:
        load_detector("default")
    except BloodcellError as exc:
        pytest.skip(str(exc))
    runner = CliRunner()
    crops = [f for f in original_files if f.parent.name in ("neutrophil", "lymphocyte")][:6]
    plain = runner.invoke(cli, ["predict", *map(str, crops), "--out", str(tmp_path / "crops.csv")])
    assert plain.exit_code == 0, plain.output
    assert "whole fields" not in plain.output
    fields = whole_fields(tmp_path / "fields", {"": crops}, seed=1)  # the fields side by side, no class folders
    warned = runner.invoke(cli, ["predict", str(fields), "--out", str(tmp_path / "fields.csv")])
    assert warned.exit_code == 0, warned.output
    assert "whole fields" in " ".join(warned.output.split()) and "bloodcell count" in warned.output
