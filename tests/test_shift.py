"""Out-of-distribution scores: the Mahalanobis head against scipy, its threshold, and the batch verdict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis

from bloodcell.models import ShiftHead, batch_shift, fit_shift_head


def gaussian_classes(rng, n=200, dim=6, classes=3, spread=4.0):
    means = rng.normal(0, spread, (classes, dim))
    labels = np.repeat(np.arange(classes), n)
    features = means[labels] + rng.normal(0, 1, (len(labels), dim))
    return features, labels, means


def test_head_is_the_distance_to_the_nearest_class_mean_as_scipy_computes_it():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 3, (4, 5))
    a = rng.normal(0, 1, (5, 5))
    precision = a @ a.T + np.eye(5)
    head = ShiftHead(torch.from_numpy(means), torch.from_numpy(precision), 2.5)
    queries = rng.normal(0, 3, (20, 5))
    expected = [min(mahalanobis(q, m, precision) for m in means) / np.sqrt(2.5) for q in queries]
    got = head(torch.from_numpy(queries).float()).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_threshold_puts_the_chosen_quantile_of_held_out_images_below_one():
    rng = np.random.default_rng(1)
    features, labels, _ = gaussian_classes(rng)
    held_out, _, _ = gaussian_classes(np.random.default_rng(1), n=400)  # same class means, new draws
    head = fit_shift_head(features, labels, held_out, quantile=0.9)
    scores = head(torch.from_numpy(held_out).float()).numpy()
    assert abs((scores > 1).mean() - 0.1) < 0.01
    # Another "lab": the same classes, shifted in feature space, scores far above 1.
    shifted = held_out + 3.0
    assert np.median(head(torch.from_numpy(shifted).float()).numpy()) > 2


def test_batch_verdict_follows_the_median_image():
    assert batch_shift(np.array([0.2, 0.5, 3.0]))["flagged"] is False  # one odd image does not flag a batch
    verdict = batch_shift(np.array([1.5, 2.0, 0.4]))
    # p_value: two or more of three beyond the threshold at the training lab's 2%: 3 * 0.02^2 * 0.98 + 0.02^3
    assert verdict == {"flagged": True, "images_flagged": 2, "images": 3, "score": 1.5, "p_value": 0.00118}
    assert batch_shift(np.array([]))["flagged"] is False
    assert batch_shift(np.array([1.2]))["flagged"] is True and batch_shift(np.array([0.9]))["flagged"] is False


def test_a_batch_partly_unlike_the_training_lab_is_flagged_by_its_count():
    """A third of a batch beyond the threshold leaves its median below it; so many are improbable for the
    training lab (about 1 in 100 of its own), and the batch is flagged. A batch in the training lab's own
    proportion is not, nor is a small one with a single odd image."""
    rng = np.random.default_rng(0)
    familiar = rng.uniform(0.1, 0.9, 300)
    partly = familiar.copy()
    partly[:100] = rng.uniform(1.2, 2.0, 100)
    assert np.median(partly) < 1
    verdict = batch_shift(partly)
    assert verdict["flagged"] is True and verdict["images_flagged"] == 100 and verdict["p_value"] < 1e-30
    own = familiar.copy()
    own[:3] = 1.5  # 1%
    assert batch_shift(own)["flagged"] is False and batch_shift(own)["p_value"] > 0.5
    assert batch_shift(np.array([0.3, 0.4, 1.6, 0.2, 0.5]))["flagged"] is False


def test_binomial_tail_is_scipys():
    from scipy.stats import binom

    from bloodcell.models.ood import binomial_tail

    for n in (1, 3, 32, 50, 300, 1538, 15382):
        for k in sorted({0, 1, 2, 7, n // 50, n // 10, n // 3, n - 1, n, n + 1}):
            for p in (0.01, 0.02, 0.3):
                expected = binom.sf(k - 1, n, p)
                assert binomial_tail(k, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-300), (k, n, p)


def test_added_class_centres_make_a_new_lab_familiar():
    rng = np.random.default_rng(2)
    features, labels, _ = gaussian_classes(rng)
    head = fit_shift_head(features, labels, features)
    other = features[:50] + 8.0
    assert np.median(head(torch.from_numpy(other).float()).numpy()) > 1
    adapted = head.with_means(torch.from_numpy(other.mean(0, keepdims=True)))
    assert np.median(adapted(torch.from_numpy(other).float()).numpy()) < np.median(head(torch.from_numpy(other).float()).numpy())


@pytest.mark.parametrize("bad", ["means", "precision"])
def test_a_shift_file_without_its_tensors_is_refused_in_one_line(tmp_path, bad):
    from bloodcell.core.errors import BloodcellError
    from bloodcell.models import load_shift_head, save_checkpoint

    tensors = {"means": torch.zeros(2, 3), "precision": torch.eye(3), "threshold": torch.tensor(1.0)}
    del tensors[bad]
    save_checkpoint(tmp_path / "shift.safetensors", tensors, {})
    (tmp_path / "best.safetensors").write_bytes(b"")
    with pytest.raises(BloodcellError, match="shift-statistics"):
        load_shift_head(tmp_path)


def test_grey_world_input_takes_out_a_labs_colour_cast():
    import torch

    from bloodcell.models import create_model

    torch.manual_seed(0)
    model, _ = create_model("cnn", 8, pretrained=False, input_norm="grey_world")
    model.eval()
    images = torch.randint(40, 200, (4, 3, 32, 32), dtype=torch.uint8)
    cast = (images.float() * torch.tensor([1.12, 1.0, 0.88]).view(1, 3, 1, 1)).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        a, b = model.normalise(images), model.normalise(cast)
        plain, _ = create_model("cnn", 8, pretrained=False)
        assert (a - b).abs().max() < 0.05  # the cast is gone, up to rounding (its gains average 1: brightness kept)
        assert (plain.normalise(images) - plain.normalise(cast)).abs().max() > 0.3  # without it, it is not
    import pytest

    from bloodcell.core.errors import BloodcellError

    with pytest.raises(BloodcellError, match="unknown input normalisation"):
        create_model("cnn", 8, pretrained=False, input_norm="white_patch")


def test_shift_temperature_is_fitted_where_far_cells_are_often_wrong():
    """Cells within the training lab's range (score <= 1) are right; far ones are often wrong.
    The fit softens the far ones (gamma > 0) and prefers gamma 0 when no cell is far."""
    from bloodcell.evaluation.shift import fit_ood_temperature

    rng = np.random.default_rng(0)
    n = 600
    labels = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), labels] += 8.0  # confident and right
    far = np.arange(n) >= n // 2
    ood = np.where(far, rng.uniform(1.5, 3.0, n), rng.uniform(0.1, 0.9, n))
    wrong = far & (rng.random(n) < 0.5)
    logits[wrong] = np.roll(logits[wrong], 1, axis=1)  # equally confident, wrong
    gamma, nll = fit_ood_temperature(logits, ood, labels, 1.0)
    assert gamma > 0
    assert nll < fit_ood_temperature(logits, ood, labels, 1.0, np.zeros(1))[1]
    near_only, _ = fit_ood_temperature(logits[~far], ood[~far], labels[~far], 1.0)
    assert near_only == 0.0


def test_shift_temperature_softens_only_far_cells_and_keeps_every_answer(tmp_path):
    from bloodcell.core.contract import ModelContract
    from bloodcell.inference.predictor import Predictor

    contract = ModelContract(model="cnn", class_names=["a", "b", "c"], image_size=32, mean=(0.5,) * 3, std=(0.2,) * 3,
                             temperature=1.5, ood_temperature=2.0)
    logits = np.array([[4.0, 1.0, 0.0], [4.0, 1.0, 0.0], [0.0, 3.0, 1.0]], np.float32)
    ood = np.array([0.5, 2.0, 3.0], np.float32)
    softened = Predictor(contract, "test", None, "x").softmax(logits, ood)
    plain = Predictor(contract.model_copy(update={"ood_temperature": 0.0}), "test", None, "x").softmax(logits, ood)
    np.testing.assert_allclose(softened[0], plain[0], rtol=1e-6)  # within the lab's range: as before
    assert softened[1].max() < plain[1].max() and softened[2].max() < plain[2].max()
    assert (softened.argmax(1) == plain.argmax(1)).all()
    np.testing.assert_allclose(softened.sum(1), 1.0, rtol=1e-6)
    # Score 2 at gamma 2: the logits are divided by 1.5 * 4.
    expected = np.exp(logits[1] / 6.0) / np.exp(logits[1] / 6.0).sum()
    np.testing.assert_allclose(softened[1], expected, rtol=1e-5)


def test_synthetic_shifts_are_two_altered_copies_of_each_image():
    from bloodcell.evaluation.shift import synthetic_shifts

    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    images[3] = 200  # a flat image: its copies are told apart by the index, not by their looks
    shifted, source = synthetic_shifts(images)
    assert shifted.shape == (10, 3, 32, 32) and shifted.dtype == torch.uint8
    assert source.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # Each copy is nearer its own image than any other image (the stain copy keeps the layout).
    for copy, k in zip(shifted[1::2], source[1::2]):
        if k != 3:
            distances = [(copy.float() - other.float()).abs().mean() for other in images]
            assert int(np.argmin(distances)) == k
    again, _ = synthetic_shifts(images)
    assert torch.equal(again, shifted)  # seeded


@pytest.mark.parametrize("size", [1, 2, 7, 32, 33, 200])
def test_batch_shift_reads_small_and_large_batches_alike(size):
    """Small batches are read in Python (the service's single images), large ones in NumPy: the same verdict."""
    from bloodcell.models.ood import OOD_THRESHOLD, out_of_distribution

    scores = np.random.default_rng(size).gamma(2.0, 0.5, size).astype(np.float32)
    verdict = batch_shift(scores)
    median = float(np.median(scores.astype(np.float64)))
    assert verdict["score"] == round(median, 4)
    beyond = int((scores > OOD_THRESHOLD).sum())
    from scipy.stats import binom

    assert verdict["flagged"] is bool(median > OOD_THRESHOLD or binom.sf(beyond - 1, size, 0.02) < 1e-4)
    assert verdict["images_flagged"] == int((scores > OOD_THRESHOLD).sum()) and verdict["images"] == size
    assert out_of_distribution(float(scores[0])) is bool(scores[0] > OOD_THRESHOLD)
    assert out_of_distribution(scores).tolist() == (scores > OOD_THRESHOLD).tolist()


def test_grey_input_sees_luminance_only():
    """input_norm="grey": Pillow's luma (convert("L")) in every channel, so a change of hue at equal
    luminance does not reach the network."""
    import torch
    from PIL import Image

    from bloodcell.models import create_model

    torch.manual_seed(0)
    model, _ = create_model("cnn", 8, pretrained=False, input_norm="grey")
    model.eval()
    rgb = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    reference = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32)
    with torch.no_grad():
        x = model.normalise(torch.from_numpy(rgb).permute(2, 0, 1)[None])
        seen = (x + model.shift) / model.scale  # back to 0-255, per channel
    assert seen.shape == (1, 3, 24, 24)
    for channel in range(3):  # Pillow rounds; the model keeps the fraction
        assert np.abs(seen[0, channel].numpy() - reference).max() <= 0.5 + 1e-3
    # the same luminance in another hue: red-heavy against green-heavy
    a = torch.tensor([200.0, 100.0, 50.0]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    luma = float((a[0, :, 0, 0] * torch.tensor([0.299, 0.587, 0.114])).sum())
    g = (luma - 0.299 * 80 - 0.114 * 120) / 0.587
    b = torch.tensor([80.0, g, 120.0]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(a), model(b), atol=1e-4)
        plain, _ = create_model("cnn", 8, pretrained=False)
        assert not torch.allclose(plain.normalise(a), plain.normalise(b), atol=1e-2)
    assert "luma" not in model.state_dict()  # saved models keep their keys


def test_reinhard_input_standardises_each_images_colours_as_the_published_transform():
    """input_norm="reinhard": each image's l-alpha-beta channel statistics made the reference's (Reinhard et
    al. 2001), checked against a NumPy transcription of the paper's formulas; a lamp's brightness
    does not reach the network; the ONNX graph answers alike."""
    import io
    import warnings

    import onnxruntime as ort
    import torch

    from bloodcell.models import create_model
    from bloodcell.models.factory import LOG_LMS_TO_LAB, REINHARD_REFERENCE, RGB_TO_LMS

    torch.manual_seed(0)
    model, _ = create_model("cnn", 8, pretrained=False, input_norm="reinhard")
    model.eval()
    rng = np.random.default_rng(0)
    images = rng.integers(30, 230, (3, 3, 24, 24)).astype(np.float32)
    images[:, 0] *= 1.15  # a colour cast
    with torch.no_grad():
        out = model.reinhard(torch.from_numpy(images)).numpy()
    # NumPy transcription (the paper prints LMS -> RGB rounded; its third row is 2% off the exact inverse)
    lms_to_rgb = np.linalg.inv(np.array(RGB_TO_LMS, dtype=np.float64))
    lab_to_log_lms = np.array([[1, 1, 1], [1, 1, -1], [1, -2, 0]]) @ np.diag([3**-0.5, 6**-0.5, 2**-0.5])
    mean, std = (np.array(v).reshape(3, 1) for v in REINHARD_REFERENCE)
    for image, got in zip(images, out):
        rgb = np.clip(image.reshape(3, -1), 1, None) / 255
        lab = np.array(LOG_LMS_TO_LAB) @ np.log(np.array(RGB_TO_LMS) @ rgb)
        lab = (lab - lab.mean(1, keepdims=True)) / lab.std(1, ddof=1, keepdims=True) * std + mean
        expected = np.clip(lms_to_rgb @ np.exp(lab_to_log_lms @ lab) * 255, 0, 255)
        assert np.abs(expected - got.reshape(3, -1)).max() < 0.05
    with torch.no_grad():
        dimmer = model.reinhard(torch.from_numpy(images * 0.8)).numpy()
    assert np.abs(dimmer - out).max() < 0.05  # a dimmer lamp: the same input
    batch = torch.from_numpy(images.round().astype(np.uint8))
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the exporter the package uses (inference/export.py), without its notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (batch,), buffer, input_names=["images"], output_names=["logits"], opset_version=17,
                          dynamo=False)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"images": batch.numpy()})[0], model(batch).numpy(), atol=1e-4)
