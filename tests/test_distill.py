"""Knowledge distillation: the loss, the targets file, and a student that follows its teacher."""

import csv

import numpy as np
import pytest
import torch
from torch import nn

from bloodcell.data import BloodcellError, open_source, preprocess
from bloodcell.training.distill import DistillationLoss, targets_for
from bloodcell.inference.teachers import item_key, load_targets, save_targets, teacher_targets
from bloodcell.models import load_model
from bloodcell.training import train

from .test_train import QUIET, cnn_config, tiny_data  # noqa: F401 - the fixture is used by name


def test_loss_mixes_the_label_term_and_the_teachers_term():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    teacher = torch.softmax(torch.randn(6, 4), 1)
    hard = nn.CrossEntropyLoss()
    assert torch.allclose(DistillationLoss(hard, 0.0, 2.0)(logits, labels, teacher), hard(logits, labels))
    # weight 1: T^2 KL(teacher_T || student_T), written out by hand
    t = 2.0
    teacher_t = torch.softmax(torch.log(teacher) / t, 1)
    student_t = torch.softmax(logits / t, 1)
    expected = (teacher_t * (teacher_t.log() - student_t.log())).sum(1).mean() * t * t
    assert torch.allclose(DistillationLoss(hard, 1.0, t)(logits, labels, teacher), expected, atol=1e-6)
    # a student that already says what the teacher says has nothing left to learn from it
    assert float(DistillationLoss(hard, 1.0, 1.0)(logits, labels, torch.softmax(logits, 1))) == pytest.approx(0, abs=1e-6)


def test_subclass_student_is_compared_on_its_classes():
    """Subclass outputs are summed into their classes before the teacher's class distribution is compared."""
    parents = torch.tensor([0, 1, 1, 2])
    logits = torch.tensor([[0.0, 2.0, 2.0, -1.0], [1.0, -3.0, 0.5, 0.0]])
    loss = DistillationLoss(nn.CrossEntropyLoss(), 1.0, 1.0, parents)
    classes = loss.class_log_probabilities(logits, 1.0).exp()
    p = torch.softmax(logits, 1)
    assert torch.allclose(classes, torch.stack([p[:, 0], p[:, 1] + p[:, 2], p[:, 3]], 1), atol=1e-6)
    assert float(loss(logits, torch.tensor([1, 0]), classes)) == pytest.approx(0, abs=1e-6)


def test_targets_file_round_trip_and_clear_errors(tmp_path):
    path = tmp_path / "t.safetensors"
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    save_targets(path, ["a/1.jpg", "b/2.jpg"], probabilities, ["x", "y", "z"], ["teacher.onnx"])
    table, names, meta = load_targets(path)
    assert names == ["x", "y", "z"] and meta["teachers"] == ["teacher.onnx"]
    assert np.array_equal(table["b/2.jpg"], probabilities[1])
    # columns follow the student's class order, whatever the teachers' order was
    reordered = targets_for(path, ["b/2.jpg", "a/1.jpg"], ["z", "x", "y"])
    assert torch.allclose(reordered, torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2]]))
    with pytest.raises(BloodcellError, match=r"no teacher targets for 1 of 2 training images \(first: c/3.jpg\)"):
        targets_for(path, ["a/1.jpg", "c/3.jpg"], ["x", "y", "z"])
    with pytest.raises(BloodcellError, match="differ from the training classes"):
        targets_for(path, ["a/1.jpg"], ["x", "y", "w"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(BloodcellError, match="not a distillation targets file"):
        load_targets(tmp_path / "junk.safetensors")


def test_teacher_targets_average_the_teachers_calibrated_probabilities(tiny_data, tmp_path):
    one = train(cnn_config(tiny_data, tmp_path / "one", phases=[{"name": "t", "epochs": 1, "lr": 3e-3, "trainable": "all"}]), **QUIET)
    two = train(cnn_config(tiny_data, tmp_path / "two", seed=2, phases=[{"name": "t", "epochs": 1, "lr": 3e-3, "trainable": "all"}]), **QUIET)
    source = open_source(tiny_data / "train.npz")
    keys, averaged, names = teacher_targets([one.run_dir, two.run_dir], source)
    assert keys == [item_key(source, item) for item in source.items] and len(set(keys)) == len(keys)
    assert averaged.shape == (len(source.items), len(names)) and np.allclose(averaged.sum(1), 1, atol=1e-5)
    singles = [teacher_targets([run], source)[1] for run in (one.run_dir, two.run_dir)]
    assert np.allclose(averaged, (singles[0] + singles[1]) / 2, atol=1e-6)
    # each teacher's own calibration temperature is applied, as `bloodcell predict` does
    model, contract = load_model(one.run_dir)
    images = np.stack([preprocess(image, contract.image_size) for image in np.load(tiny_data / "train.npz")["images"][:8]])
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        expected = torch.softmax(model(images) / contract.temperature, 1).numpy()
    assert np.allclose(singles[0][:8], expected, atol=1e-5)


def test_student_follows_its_teacher_not_the_labels(tiny_data, tmp_path):
    """With all the weight on the teacher, a teacher that names the next class teaches the next class."""
    source = open_source(tiny_data / "train.npz")
    labels = np.array([item.label for item in source.items])
    shifted = np.eye(8, dtype=np.float32)[(labels + 1) % 8] * 0.93 + 0.01  # confident, and wrong by one class
    targets = tmp_path / "shifted.safetensors"
    save_targets(targets, [item_key(source, item) for item in source.items], shifted, source.class_names)
    five = [{"name": "t", "epochs": 5, "lr": 3e-3, "trainable": "all"}]
    lines = []
    student = train(cnn_config(tiny_data, tmp_path / "student", phases=five, class_weights=False,
                               distill={"targets": targets, "weight": 1.0, "temperature": 1.0}), log=lines.append)
    assert any("distillation: teachers' targets for 320 training images" in line and "agree with 0.00%" in line for line in lines)
    model = student.model.eval()
    images = torch.from_numpy(np.load(tiny_data / "train.npz")["images"]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        predicted = model(images).argmax(1).numpy()
    assert (predicted == (labels + 1) % 8).mean() > 0.4 > (predicted == labels).mean()


def test_cli_writes_targets_a_training_config_can_use(tiny_data, tmp_path):
    from typer.testing import CliRunner

    from bloodcell.cli import app

    teacher = train(cnn_config(tiny_data, tmp_path / "teacher", phases=[{"name": "t", "epochs": 1, "lr": 3e-3, "trainable": "all"}]), **QUIET)
    out = tmp_path / "targets.safetensors"
    result = CliRunner().invoke(app, ["distill-targets", str(teacher.run_dir), "--data", str(tiny_data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "320 images scored by 1 teacher(s)" in result.output
    table, names, meta = load_targets(out)
    assert len(table) == 320 and meta["teachers"] == [str(teacher.run_dir)]
    source = open_source(tiny_data / "train.npz")
    labels = np.array([item.label for item in source.items])
    scored = np.stack([table[item_key(source, item)] for item in source.items])
    share = float((scored.argmax(1) == labels).mean())
    assert f"agreeing with {share:.2%} of the labels" in result.output
    listed = list(csv.DictReader(open(tmp_path / "targets.disagreements.csv")))
    assert len(listed) == round(320 * (1 - share)) and f"{len(listed)} images where the teachers' class is not the label" in result.output
    names_of = {item_key(source, item): source.class_names[item.label] for item in source.items}
    assert all(row["label"] == names_of[row["image"]] != row["teachers"] for row in listed)
    assert [float(r["probability"]) for r in listed] == sorted((float(r["probability"]) for r in listed), reverse=True)
    missing = CliRunner().invoke(app, ["distill-targets", str(tmp_path / "nope.onnx"), "--data", str(tiny_data), "--out", str(out)])
    assert missing.exit_code != 0 and "nope.onnx: model not found" in missing.output and "Traceback" not in missing.output


def test_training_refuses_missing_targets_before_it_starts(tiny_data, tmp_path):
    with pytest.raises(BloodcellError, match="none.safetensors: distillation targets not found"):
        train(cnn_config(tiny_data, tmp_path / "run", distill={"targets": tmp_path / "none.safetensors"}), **QUIET)
    assert not (tmp_path / "run").exists()  # no half-made run directory is left behind
