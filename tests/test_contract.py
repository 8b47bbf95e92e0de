"""The model contract: typed, versioned, written once and read back everywhere; old files still load."""
from pathlib import Path

import json

import pytest

from bloodcell.core.contract import SCHEMA_VERSION, ModelContract, parse_contract, read_contract, write_contract
from bloodcell.core.errors import BloodcellError
from bloodcell.inference import DEFAULT_MODEL_DIR

OLD = {"model": "cnn", "class_names": ["a", "b"], "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
       "framing": None, "cnn": {"channels": [8]}, "subclasses": None, "temperature": None}


def test_a_contract_from_before_the_schema_loads_with_defaults():
    contract = parse_contract(OLD)
    assert contract.schema_version == SCHEMA_VERSION and contract.temperature == 1.0
    assert contract.class_names == ["a", "b"] and contract.mean == (0.5, 0.5, 0.5)


def test_write_then_read_is_the_same_contract(tmp_path):
    contract = ModelContract(model="cnn", class_names=["a", "b"], image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                             temperature=0.7, subclasses={"names": ["a", "b:x", "b"], "parents": [0, 1, 1]})
    write_contract(tmp_path, contract)
    assert json.loads((tmp_path / "model.json").read_text())["schema_version"] == SCHEMA_VERSION
    assert read_contract(tmp_path) == contract


@pytest.mark.parametrize("change,message", [
    ({"schema_version": SCHEMA_VERSION + 1}, "newer bloodcell"),
    ({"image_size": "big"}, "image_size"),
    ({"class_names": None}, "class_names"),
])
def test_bad_or_newer_contracts_are_one_clear_error(change, message):
    with pytest.raises(BloodcellError, match=message):
        parse_contract({**OLD, **change}, "run/model.json")


def test_the_shipped_model_files_load_through_the_contract():
    from bloodcell.inference import load_predictor

    if not (DEFAULT_MODEL_DIR / "model.onnx").is_file():
        pytest.skip("no default model in this checkout")
    from_json = read_contract(DEFAULT_MODEL_DIR)
    from_onnx = load_predictor("default").contract
    assert from_json.class_names == from_onnx.class_names and from_json.image_size == from_onnx.image_size == 128
    assert from_onnx.framing == from_json.framing and from_onnx.temperature == pytest.approx(from_json.temperature)


def test_weights_and_data_come_from_settings(tmp_path, monkeypatch):
    from bloodcell.core.settings import default_weights, resolve_data, resolve_weights
    from bloodcell.training import TrainConfig
    from bloodcell.training.trainer import backbone_weights

    (tmp_path / "w").mkdir()
    wanted = tmp_path / "w" / "tf_mobilenetv3_small_100.from_tflite.safetensors"
    wanted.write_bytes(b"")
    (tmp_path / "w" / "mobilenetv2_100.pth").write_bytes(b"")
    monkeypatch.setenv("BLOODCELL_WEIGHTS", str(tmp_path / "w"))
    assert default_weights("tf_mobilenetv3_small_100") == wanted
    assert default_weights("resnet18") is None
    assert backbone_weights(TrainConfig(data=tmp_path)) == wanted  # no weights named: the model's file
    assert backbone_weights(TrainConfig(data=tmp_path, weights=wanted.name)) == wanted  # a bare name is looked up
    assert backbone_weights(TrainConfig(data=tmp_path, model="cnn")) is None
    assert resolve_weights("elsewhere/missing.pth") == Path("elsewhere/missing.pth")  # a path is kept as given
    monkeypatch.delenv("BLOODCELL_DATA", raising=False)
    with pytest.raises(BloodcellError, match="doi:10.17632/snkd93bnjr.1"):
        resolve_data(None)
    monkeypatch.setenv("BLOODCELL_DATA", str(tmp_path))
    with pytest.raises(BloodcellError, match="pbc224: no such file or folder.*get PBC"):
        resolve_data(None)
    (tmp_path / "pbc224").mkdir()
    assert resolve_data(None) == tmp_path / "pbc224"
    # a config file's "$BLOODCELL_DATA/fields" (as the shipped detector's config.yaml writes it) is expanded,
    # and a missing field set says what a field set is, not where to get PBC
    with pytest.raises(BloodcellError, match="fields: no such file or folder.*boxed field set"):
        resolve_data("$BLOODCELL_DATA/fields", "fields")
    (tmp_path / "fields").mkdir()
    assert resolve_data("$BLOODCELL_DATA/fields", "fields") == tmp_path / "fields"


def test_train_config_policy_is_the_libraries_not_the_clis():
    from bloodcell.training import TrainConfig, build_train_config

    cnn = TrainConfig(model="cnn")
    assert [(p.name, p.trainable) for p in cnn.phases] == [("train", "all")]
    assert build_train_config(model="cnn", data="d").phases == cnn.phases
    assert [p.name for p in TrainConfig().phases] == ["head", "finetune"]
    changed = build_train_config(overrides=["phases.1.lr=3e-4"], data="d")
    assert changed.phases[1].lr == 3e-4
