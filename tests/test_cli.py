import pytest
import json

from typer.testing import CliRunner

from bloodcell.cli import app

runner = CliRunner()


def test_curate_command_end_to_end(dirty_folder, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["curate", str(dirty_folder["root"]), "--out", str(out), "--set", "split.seed=5"])
    assert result.exit_code == 0, result.output
    assert "Report:" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["statuses"]["outlier"] >= 16
    assert "seed: 5" in (out / "config.yaml").read_text()


def test_missing_input_is_one_line_not_a_traceback(tmp_path):
    result = runner.invoke(app, ["curate", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no such file or folder" in result.output
    assert "Traceback" not in result.output


def test_bad_setting_is_explained(dirty_folder, tmp_path):
    result = runner.invoke(app, ["curate", str(dirty_folder["root"]), "--out", str(tmp_path / "o"),
                                 "--set", "split.train=0.95"])
    assert result.exit_code == 2
    assert "split fractions must add up to 1" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_leakage_exit_code_says_whether_anything_leaked(original_files, tmp_path):
    for name, files in (("a", original_files[:10]), ("b", original_files[8:14])):
        folder = tmp_path / name / "basophil"
        folder.mkdir(parents=True)
        for f in files:
            (folder / f.name).write_bytes(f.read_bytes())
    result = runner.invoke(app, ["leakage", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 1
    assert "2 leaked pairs (2 exact, 0 near)" in result.output
    clean = runner.invoke(app, ["leakage", str(tmp_path / "a" ), str(tmp_path / "a")])
    assert clean.exit_code == 1  # a dataset leaks into itself


@pytest.mark.slow
def test_train_evaluate_report_commands(tmp_path):
    from .test_train import make_tiny_data

    data = make_tiny_data(tmp_path / "data")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(data), "--model", "cnn", "--image-size", "32", "--epochs", "2",
                                 "--batch-size", "32", "--out", str(run), "--set", "cnn.channels=[8, 16]",
                                 "--set", "phases.0.lr=0.002"])
    assert result.exit_code == 0, result.output
    assert "epoch 2/2 [train]" in result.output and (run / "best.safetensors").is_file()
    assert "lr: 0.002" in (run / "config.yaml").read_text()
    result = runner.invoke(app, ["evaluate", "--model", str(run), "--data", str(data / "val.npz")])
    assert result.exit_code == 0, result.output
    assert "macro_f1" in result.output and (run / "evaluation" / "metrics.json").is_file()
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file()
    again = runner.invoke(app, ["train", "--resume", str(tmp_path / "nowhere")])
    assert again.exit_code == 2 and "not a run directory" in again.output


def test_train_without_data_is_explained():
    result = runner.invoke(app, ["train", "--model", "cnn"])
    assert result.exit_code == 2 and "no data" in result.output


def test_recipe_overrides_are_validated_before_any_work(tmp_path):
    import yaml

    from bloodcell.workflows import packaged_config

    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(packaged_config("default_model.yaml")))
    result = runner.invoke(app, ["recipe", "--config", str(config), "--data", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "out"), "--set", "train.image_size=4"])
    assert result.exit_code != 0
    assert "bad train settings" in result.output and "image_size" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
