"""Tiny real training runs: a few hundred PBC images at 32-48 px, 1-3 epochs."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell.data import CLASS_NAMES, BloodcellError
from bloodcell.models import create_model, has_folded_batchnorm, recalibrate_folded_batchnorm
from bloodcell.data.splits import TensorImages, load_split
from bloodcell.training import TrainConfig, scale_epochs, train
from bloodcell.training.freezing import apply_phase, parameter_groups
from bloodcell.training.config import epoch_image_size
from bloodcell.training.saver import last_epoch_weights
from bloodcell.models import load_checkpoint
from bloodcell.training.loop import train_one_epoch

from .conftest import PBC224, SHARED, require

WEIGHTS = SHARED.parent / "weights" / "tf_mobilenetv3_small_100.from_tflite_int8ptq.safetensors"
QUIET = dict(log=lambda line: None)


def make_tiny_data(root: Path) -> Path:
    """train.npz / val.npz of real PBC cells at 48 px: 40 + 10 per class."""
    require(PBC224)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    parts = {"train": ([], []), "val": ([], [])}
    for label, name in enumerate(CLASS_NAMES):
        files = sorted((PBC224 / name).glob("*.jpg"))
        for k, index in enumerate(rng.choice(len(files), 50, replace=False)):
            image = np.asarray(Image.open(files[index]).convert("RGB").resize((48, 48), Image.Resampling.BICUBIC))
            split = "train" if k < 40 else "val"
            parts[split][0].append(image)
            parts[split][1].append(label)
    for split, (images, labels) in parts.items():
        np.savez(root / f"{split}.npz", images=np.stack(images), labels=np.array(labels))
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny"))


def cnn_config(data, out, **overrides):
    settings = dict(data=data, out=out, model="cnn", image_size=32, batch_size=32, seed=1,
                    phases=[{"name": "train", "epochs": 3, "lr": 3e-3, "trainable": "all"}],
                    cnn={"channels": [16, 32, 64], "convs_per_block": 1})
    settings.update(overrides)
    return TrainConfig(**settings)


def test_cnn_learns_and_writes_a_complete_run_dir(tiny_data, tmp_path):
    result = train(cnn_config(tiny_data, tmp_path / "run"), **QUIET)
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    assert len(rows) == 3
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    for name in ("config.yaml", "model.json", "metrics.csv", "accuracy.png", "loss.png",
                 "best.safetensors", "last.safetensors"):
        assert (result.run_dir / name).is_file(), name
    for column in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_macro_f1", "lr", "images_per_s"):
        assert column in rows[0]
    tensors, meta = load_checkpoint(result.run_dir / "best.safetensors")
    assert meta["class_names"] == list(CLASS_NAMES) and meta["image_size"] == 32
    assert any(k.startswith("net.") for k in tensors)


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_resume_after_interruption_equals_uninterrupted(tiny_data, tmp_path, schedule):
    """Both schedules: the cosine one (the recipe's) is saved without its lambdas and must load back."""
    full = train(cnn_config(tiny_data, tmp_path / "full", schedule=schedule), **QUIET)
    train(cnn_config(tiny_data, tmp_path / "cut", schedule=schedule), stop_after_epochs=2, **QUIET)
    resumed = train(None, resume=tmp_path / "cut", **QUIET)
    a, _ = load_checkpoint(full.run_dir / "last.safetensors")
    b, _ = load_checkpoint(resumed.run_dir / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["val_loss"] for r in full.rows] == [r["val_loss"] for r in resumed.rows]


def test_same_seed_same_weights_whatever_ran_before(tiny_data, tmp_path):
    # `recipe` curates in the same process first: training must not depend on the generators' state.
    runs = []
    for name, disturbance in (("a", 123), ("b", 456)):
        torch.manual_seed(disturbance)
        torch.rand(disturbance)
        one_epoch = [{"name": "train", "epochs": 1, "lr": 3e-3, "trainable": "all"}]
        runs.append(train(cnn_config(tiny_data, tmp_path / name, phases=one_epoch), **QUIET))
    a, _ = load_checkpoint(runs[0].run_dir / "last.safetensors")
    b, _ = load_checkpoint(runs[1].run_dir / "last.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_write_is_atomic(tiny_data, tmp_path, monkeypatch):
    from bloodcell.training import trainer as train_module

    run = train(cnn_config(tiny_data, tmp_path / "run", phases=[{"name": "t", "epochs": 1, "lr": 1e-3}]), **QUIET)
    before = (run.run_dir / "last.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr("safetensors.torch.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        train_module.save_checkpoint(run.run_dir / "last.safetensors", {"x": torch.zeros(1)}, {})
    assert (run.run_dir / "last.safetensors").read_bytes() == before


def test_keep_chooses_best_validation_or_last_epoch_weights(tiny_data, tmp_path):
    # With an EMA, the kept weights are the EMA's; `keep: last` ships the last epoch's, whatever validation said.
    three = [{"name": "train", "epochs": 3, "lr": 3e-3, "trainable": "all"}]
    best = train(cnn_config(tiny_data, tmp_path / "best", ema_decay=0.9, phases=three), **QUIET)
    last = train(cnn_config(tiny_data, tmp_path / "last", ema_decay=0.9, phases=three, keep="last"), **QUIET)
    scores = [row["val_macro_f1"] for row in best.rows]
    _, best_meta = load_checkpoint(best.run_dir / "best.safetensors")
    assert best_meta["epoch"] == 1 + scores.index(max(scores)) and best_meta["keep"] == "best"
    # Same seed, same data: the two trainings are the same up to what they keep.
    assert [row["val_loss"] for row in best.rows] == [row["val_loss"] for row in last.rows]
    kept, last_meta = load_checkpoint(last.run_dir / "best.safetensors")
    assert last_meta["epoch"] == 3 and last_meta["keep"] == "last"
    assert last_meta["val"]["macro_f1"] == pytest.approx(last.rows[-1]["val_macro_f1"])
    ema_weights, meta = last_epoch_weights(best.run_dir)  # the same weights, read back from the resume point
    assert meta["epoch"] == 3 and meta["val"]["macro_f1"] == pytest.approx(best.rows[-1]["val_macro_f1"])
    assert ema_weights.keys() == kept.keys()
    assert all(torch.equal(ema_weights[k], kept[k]) for k in kept)
    live, _ = load_checkpoint(best.run_dir / "last.safetensors")
    assert not all(torch.equal(live["model." + k], kept[k]) for k in kept)  # the EMA's, not the live model's


@pytest.fixture(scope="module")
def mobilenet():
    require(WEIGHTS)
    model, contract = create_model("tf_mobilenetv3_small_100", 8, WEIGHTS)
    return model, contract


def test_normalisation_is_read_from_timm(mobilenet):
    _, contract = mobilenet
    assert contract["mean"] == (0.5, 0.5, 0.5) and contract["std"] == (0.5, 0.5, 0.5)


def test_folded_batchnorm_recalibration_keeps_the_eval_function(tiny_data):
    require(WEIGHTS)
    model, _ = create_model("tf_mobilenetv3_small_100", 8, WEIGHTS)
    assert has_folded_batchnorm(model)
    images = torch.from_numpy(np.load(tiny_data / "train.npz")["images"]).permute(0, 3, 1, 2).contiguous()
    model.eval()
    with torch.no_grad():
        before = model(images[:32])
    recalibrate_folded_batchnorm(model, images[:256])
    assert not has_folded_batchnorm(model)
    with torch.no_grad():
        after = model(images[:32])
    assert torch.allclose(before, after, atol=1e-3, rtol=1e-3)
    # In train mode the batch statistics now match the running ones.
    model.train()
    with torch.no_grad():
        train_mode = model(images[:256])[:32]
    assert torch.allclose(train_mode, after, atol=0.25 * after.abs().max().item())


def test_phases_freeze_what_they_should(mobilenet, tiny_data):
    model, _ = create_model("tf_mobilenetv3_small_100", 8, WEIGHTS)
    split = load_split(__import__("bloodcell.data", fromlist=["open_source"]).open_source(tiny_data / "train.npz"),
                       list(CLASS_NAMES), 32)
    loader = torch.utils.data.DataLoader(TensorImages(split), batch_size=32, shuffle=True)
    groups = parameter_groups(model)
    head = set(groups[-1])
    assert any("classifier" in name for name in head)

    def snapshot():
        return {k: v.clone() for k, v in model.state_dict().items()}

    for trainable, expected_groups in (("head", groups[-1:]), ("top:2", groups[-3:])):
        chosen = set(apply_phase(model, trainable))
        assert chosen == {n for g in expected_groups for n in g}
        for name, param in model.named_parameters():
            assert param.requires_grad == (name in chosen), name
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        before = snapshot()
        from bloodcell.training.distributed import Dist

        train_one_epoch(model, loader, torch.nn.CrossEntropyLoss(), optimizer, torch.device("cpu"), Dist())
        after = snapshot()
        for key in before:
            owner = key.rsplit(".", 1)[0]
            trains = any(n.rsplit(".", 1)[0] == owner for n in chosen)
            if trains and key.endswith("weight"):
                assert not torch.equal(before[key], after[key]), key
            if not trains:  # frozen weights and frozen BatchNorm statistics stay as they were
                assert torch.equal(before[key], after[key]), key


def test_two_phase_fine_tuning_runs_end_to_end(tiny_data, tmp_path):
    require(WEIGHTS)
    config = TrainConfig(data=tiny_data, out=tmp_path / "ft", weights=WEIGHTS, image_size=32, batch_size=32,
                         phases=[{"name": "head", "epochs": 1, "lr": 3e-3, "trainable": "head"},
                                 {"name": "finetune", "epochs": 1, "lr": 1e-3, "trainable": "top:2"}])
    lines = []
    result = train(config, log=lines.append)
    assert any("recalibrated" in line for line in lines)
    rows = result.rows
    assert [r["phase"] for r in rows] == ["head", "finetune"]
    assert rows[1]["trainable_params"] > rows[0]["trainable_params"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model": "resnet_does_not_exist"}, "unknown model"),
        ({"data": "/no/such/folder"}, "data path not found"),
    ],
)
def test_bad_configs_fail_before_training(tiny_data, tmp_path, overrides, message):
    data = overrides.pop("data", tiny_data)
    config = cnn_config(data, tmp_path / "bad", **overrides)
    with pytest.raises(BloodcellError, match=message):
        train(config, **QUIET)
    assert not (tmp_path / "bad" / "metrics.csv").exists()


@pytest.mark.slow
def test_weights_of_another_architecture_are_refused(tmp_path):
    require(WEIGHTS)
    with pytest.raises(BloodcellError, match="does not fit mobilenetv3_large_100"):
        create_model("mobilenetv3_large_100", 8, WEIGHTS)


def test_wrong_class_count_in_class_weights(tiny_data, tmp_path):
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "class_weights.json").write_text(json.dumps({"weights": [1.0] * 5}))
    with pytest.raises(BloodcellError, match="5 class weights for 8 classes"):
        train(cnn_config(data, tmp_path / "run"), **QUIET)


DDP_SCRIPT = """
import sys, hashlib, torch
from bloodcell.training import TrainConfig, train
out = sys.argv[2]
config = TrainConfig(data=sys.argv[1], out=out + "/run", model="cnn", image_size=32, batch_size=16, seed=3,
                     phases=[{"name": "t", "epochs": 1, "lr": 3e-3}], cnn={"channels": [8, 16], "convs_per_block": 1})
result = train(config, log=lambda line: None)
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in result.model.state_dict().values())).hexdigest()
rank = torch.distributed.get_rank()
open(f"{out}/rank{rank}.txt", "w").write(digest)
"""


@pytest.mark.distributed
def test_ddp_two_processes_end_with_identical_weights(tiny_data, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tiny_data), str(tmp_path)], env=env, timeout=300, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    assert (tmp_path / "run" / "metrics.csv").is_file()


def test_training_options_run_together(tiny_data, tmp_path):
    """EMA, cosine schedule with warm-up, balanced sampler, gradient clipping, label smoothing."""
    config = cnn_config(tiny_data, tmp_path / "opts", ema_decay=0.9, schedule="cosine", warmup_epochs=1,
                        balanced_sampler=True, grad_clip=1.0, label_smoothing=0.1, monitor="val_loss",
                        phases=[{"name": "t", "epochs": 3, "lr": 3e-3}])
    result = train(config, **QUIET)
    lrs = [r["lr"] for r in result.rows]
    assert lrs[0] < 3e-3 and lrs[-1] < lrs[1]  # warm-up, then cosine decay
    tensors, _ = load_checkpoint(result.run_dir / "last.safetensors")
    assert any(k.startswith("ema.") for k in tensors)


@pytest.mark.parametrize("buffers", ["averaged", "live"])
def test_ema_batchnorm_statistics_averaged_or_live(tiny_data, tmp_path, buffers):
    config = cnn_config(tiny_data, tmp_path / buffers, ema_decay=0.9, ema_buffers=buffers,
                        phases=[{"name": "t", "epochs": 2, "lr": 3e-3}])
    train(config, **QUIET)
    tensors, _ = load_checkpoint(tmp_path / buffers / "last.safetensors")
    live = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.") and k.endswith("running_mean")}
    averaged = {k[len("ema.module."):]: v for k, v in tensors.items() if k.startswith("ema.module.") and k.endswith("running_mean")}
    assert live and live.keys() == averaged.keys()
    same = all(torch.equal(live[k], averaged[k]) for k in live)
    assert same == (buffers == "live")


def test_early_stopping_stops(tiny_data, tmp_path):
    # A learning rate too small to improve anything: patience 1 stops after 2 epochs.
    config = cnn_config(tiny_data, tmp_path / "es", early_stopping_patience=1, monitor="val_accuracy",
                        phases=[{"name": "t", "epochs": 6, "lr": 1e-9}])
    lines = []
    result = train(config, log=lines.append)
    assert len(result.rows) < 6
    assert any("early stopping" in line for line in lines)


def test_no_weights_and_no_network_names_both_ways(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BloodcellError, match="--weights PATH.*network"):
        create_model("tf_mobilenetv3_small_100", 8, weights=None, pretrained=True)


# ---------------------------------------------------------------- subclasses


def test_subclasses_keep_frequent_ones_and_a_remainder():
    from bloodcell.training import SubclassConfig
    from bloodcell.training.subclasses import find_subclasses

    names = ["ig", "neutrophil", "platelet"]
    files = ([("MY_1.jpg", 0)] * 5 + [("MMY_2.jpg", 0)] * 5 + [("PMY_3.jpg", 0)] * 2  # PMY too rare
             + [("BNE_4.jpg", 1)] * 5 + [("SNE_5.jpg", 1)] * 5                         # no remainder
             + [("PLATELET_6.jpg", 2)] * 9 + [("odd.jpg", 2)])                          # one subclass only
    paths = [f"data/{names[label]}/{name}" for name, label in files]
    labels = [label for _, label in files]
    config = SubclassConfig(min_images=5)
    found = find_subclasses(paths, labels, names, config)
    assert found.names == ["ig:MMY", "ig:MY", "ig", "neutrophil:BNE", "neutrophil:SNE", "platelet"]
    assert found.parents == [0, 0, 0, 1, 1, 2]
    fine = found.labels(paths, torch.tensor(labels), names, config)
    assert fine.tolist() == [1] * 5 + [0] * 5 + [2] * 2 + [3] * 5 + [4] * 5 + [5] * 10
    with pytest.raises(BloodcellError, match="subclass 'neutrophil:XNE' was not among"):
        found.labels(["val/neutrophil/XNE_7.jpg"], torch.tensor([1]), names, config)


def test_subclass_model_answers_with_summed_class_probabilities():
    model, _ = create_model("cnn", 3, pretrained=False, subclass_parents=[0, 1, 1, 2, 1])
    model.eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        classes = model(images)
        model.emit_subclasses = True
        subclasses = model(images)
    assert classes.shape == (4, 3) and subclasses.shape == (4, 5)
    fine = subclasses.softmax(1)
    summed = torch.stack([fine[:, 0], fine[:, [1, 2, 4]].sum(1), fine[:, 3]], 1)
    assert torch.allclose(classes.softmax(1), summed, atol=1e-6)
    with pytest.raises(BloodcellError, match="cover each of the 3 classes"):
        create_model("cnn", 3, pretrained=False, subclass_parents=[0, 0, 2])


@pytest.mark.slow
def test_training_on_subclasses_predicts_classes_after_export(tmp_path):
    """Real PBC file names (BNE_/SNE_, MY_/MMY_): trained on subclasses, every output is over the 8 classes."""
    from bloodcell.models import load_model
    from bloodcell.inference.export import export_onnx
    from bloodcell.inference import load_predictor

    require(PBC224)
    rng = np.random.default_rng(0)
    check = []
    for name in CLASS_NAMES:
        files = sorted((PBC224 / name).glob("*.jpg"))
        prefixes = {"neutrophil": ("BNE_", "SNE_"), "ig": ("MY_", "MMY_")}.get(name, ("",))
        for prefix in prefixes:
            chosen = [f for f in files if f.name.startswith(prefix)]
            for k, index in enumerate(rng.choice(len(chosen), 8, replace=False)):
                split = "train" if k < 6 else "val"
                image = Image.open(chosen[index]).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
                (tmp_path / "data" / split / name).mkdir(parents=True, exist_ok=True)
                image.save(tmp_path / "data" / split / name / chosen[index].name.replace(".jpg", ".png"))
                check.append(np.asarray(image))
    lines = []
    config = cnn_config(tmp_path / "data", tmp_path / "run", subclasses={"min_images": 6},
                        phases=[{"name": "train", "epochs": 2, "lr": 3e-3, "trainable": "all"}])
    result = train(config, log=lines.append)
    assert any("subclasses: 10 targets for 8 classes (ig:MMY, ig:MY, neutrophil:BNE, neutrophil:SNE)" in line
               for line in lines)
    model, contract = load_model(result.run_dir)
    assert contract.subclasses.names[3:5] == ["ig:MMY", "ig:MY"]
    assert contract.subclasses.parents == [0, 1, 2, 3, 3, 4, 5, 6, 6, 7]
    report = export_onnx(result.run_dir, tmp_path / "model.onnx", check_images=check[:16])
    assert report["max_prob_diff"] < 1e-4
    onnx_predictor = load_predictor(tmp_path / "model.onnx")
    probabilities = onnx_predictor.probabilities(check[:16])
    assert onnx_predictor.class_names == list(CLASS_NAMES) and probabilities.shape == (16, 8)
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    # Static int8 must leave the merge in float (its -1e4 mask would flatten every logit).
    from bloodcell.inference.export import nodes_after_classifier

    assert any("ReduceLogSumExp" in name for name in nodes_after_classifier(tmp_path / "model.onnx"))
    plain = train(cnn_config(tmp_path / "data", tmp_path / "plain", phases=[{"name": "t", "epochs": 1, "lr": 3e-3}]), **QUIET)
    export_onnx(plain.run_dir, tmp_path / "plain.onnx")
    assert nodes_after_classifier(tmp_path / "plain.onnx") == []


def test_subclass_pattern_without_a_group_is_refused(tiny_data, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="has no group"):
        cnn_config(tiny_data, tmp_path / "run", subclasses={"pattern": "^[A-Z]+_"})
    with pytest.raises(ValidationError, match="not a regular expression"):
        cnn_config(tiny_data, tmp_path / "run", subclasses={"pattern": "^([A-Z]+_"})


def test_balanced_sampler_balances_classes_not_subclasses(tiny_data, tmp_path):
    from bloodcell.training.distributed import Dist
    from bloodcell.data.splits import Split
    from bloodcell.training.schedule import epoch_loader

    # Class 0 has two subclasses (0, 1) of 300 images each; class 1 one subclass (2) of 300.
    subclass_labels = torch.tensor([0] * 300 + [1] * 300 + [2] * 300)
    class_labels = torch.tensor([0] * 600 + [1] * 300)
    split = Split(torch.zeros(900, 3, 4, 4, dtype=torch.uint8), subclass_labels, [""] * 900)
    config = cnn_config(tiny_data, tmp_path, balanced_sampler=True, batch_size=900)
    loader = epoch_loader(config, split, None, 1, Dist(), class_labels)
    _, drawn = next(iter(loader))
    share_of_class_1 = (drawn == 2).float().mean().item()
    assert 0.43 < share_of_class_1 < 0.57  # balanced by class: half; by subclass it would be a third


def test_training_accuracy_on_subclasses_counts_classes():
    """A prediction of the label's sibling subclass is right for the class: accuracy 1, not 0."""
    from bloodcell.training.distributed import Dist

    class SiblingGuesser(torch.nn.Module):  # always scores subclass 1 highest
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([0.0, 5.0, 0.0]))

        def forward(self, images):
            return self.bias.expand(len(images), 3)

    images = torch.zeros(8, 3, 4, 4)
    loader = [(images, torch.zeros(8, dtype=torch.int64))]  # every image is subclass 0
    model = SiblingGuesser()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    criterion = torch.nn.CrossEntropyLoss()
    with_parents = train_one_epoch(model, loader, criterion, optimizer, "cpu", Dist(), parents=torch.tensor([0, 0, 1]))
    without = train_one_epoch(model, loader, criterion, optimizer, "cpu", Dist())
    assert with_parents["accuracy"] == 1.0 and without["accuracy"] == 0.0


def test_progressive_sizes_ramp_up_to_the_image_size():
    config = TrainConfig(data=".", image_size=128, progressive={"start_size": 96, "epochs": 4, "step": 16})
    sizes = [epoch_image_size(config, epoch) for epoch in range(1, 8)]
    assert sizes[0] == 96 and sizes[4:] == [128, 128, 128]
    assert sizes == sorted(sizes) and all(size % 16 == 0 for size in sizes)
    assert epoch_image_size(TrainConfig(data=".", image_size=128), 1) == 128  # off: always the full size
    with pytest.raises(ValueError, match="larger than image_size"):
        TrainConfig(data=".", image_size=64, progressive={"start_size": 96})
    with pytest.raises(ValueError, match="no epoch at image_size"):
        TrainConfig(data=".", image_size=128, progressive={"epochs": 15})  # the default phases have 15 epochs
    # A shortened run (--epochs, the quick profile) shortens the ramp and keeps a last epoch at full size.
    long = TrainConfig(data=".", image_size=128, progressive={"start_size": 96, "epochs": 10},
                       phases=[{"name": "a", "epochs": 2, "lr": 1e-3}, {"name": "b", "epochs": 18, "lr": 1e-3}])
    assert scale_epochs(long, 4).progressive.epochs == 2
    assert scale_epochs(long, 2).progressive.epochs == 1


def test_progressive_training_feeds_small_crops_first_and_validates_at_full_size(tiny_data, tmp_path, monkeypatch):
    import bloodcell.training.trainer as train_module

    seen = {"train": [], "val": []}
    real_train_one_epoch, real_evaluate = train_module.train_one_epoch, train_module.evaluate

    def spy_train(model, loader, *args, **kwargs):
        seen["train"].append(next(iter(loader))[0].shape[-1])
        return real_train_one_epoch(model, loader, *args, **kwargs)

    def spy_evaluate(model, loader, *args, **kwargs):
        seen["val"].append(next(iter(loader))[0].shape[-1])
        return real_evaluate(model, loader, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", spy_train)
    monkeypatch.setattr(train_module, "evaluate", spy_evaluate)
    run = train(cnn_config(tiny_data, tmp_path / "run", progressive={"start_size": 16, "epochs": 2, "step": 8}), **QUIET)
    assert seen == {"train": [16, 24, 32], "val": [32, 32, 32]}
    assert [int(row["train_size"]) for row in csv.DictReader(open(run.run_dir / "metrics.csv"))] == [16, 24, 32]


def test_metrics_csv_keeps_rows_written_before_a_column_existed(tmp_path):
    """A run resumed from an older version has early rows without `train_size`: the file keeps them all."""
    from bloodcell.training.curves import write_metrics

    old = {"epoch": 1, "phase": "t", "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5,
           "val_macro_f1": 0.4, "lr": 1e-3, "images_per_s": 10.0, "trainable_params": 5}
    new = {**old, "epoch": 2, "train_size": 32}
    write_metrics([old, new], tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert [row["train_size"] for row in rows] == ["", "32"]


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0)])
def test_mixed_batches_carry_labels_in_proportion_to_their_pixels(mixup, cutmix):
    """The soft targets the loss gets match how much of each image a mixed image holds (MixUp: the blend
    weight; CutMix: the pasted area), so a mixed batch teaches what it shows."""
    from bloodcell.training.loop import batch_mixer

    torch.manual_seed(0)
    mix = batch_mixer(mixup, cutmix, num_classes=8)
    images = torch.zeros(2, 3, 32, 32)
    images[1] = 255.0  # image 0 black (label 2), image 1 white (label 5)
    for _ in range(5):
        mixed, targets = mix(images.clone(), torch.tensor([2, 5]))
        assert torch.allclose(targets.sum(1), torch.ones(2))
        white = mixed.mean(dim=(1, 2, 3)) / 255.0  # each mixed image's share of the white image
        assert torch.allclose(targets[:, 5], white, atol=1e-5)
        assert torch.allclose(targets[:, 2], 1 - white, atol=1e-5)
    assert batch_mixer(0.0, 0.0, 8) is None


def test_training_with_mixed_batches(tiny_data, tmp_path):
    one_epoch = [{"name": "train", "epochs": 1, "lr": 3e-3, "trainable": "all"}]
    plain = train(cnn_config(tiny_data, tmp_path / "plain", phases=one_epoch), **QUIET)
    mixed = train(cnn_config(tiny_data, tmp_path / "mixed", phases=one_epoch, mixup_alpha=0.2, cutmix_alpha=1.0), **QUIET)
    again = train(cnn_config(tiny_data, tmp_path / "again", phases=one_epoch, mixup_alpha=0.2, cutmix_alpha=1.0), **QUIET)
    assert mixed.rows[0]["train_loss"] != plain.rows[0]["train_loss"]  # the batches were mixed
    assert mixed.rows[0]["train_loss"] == again.rows[0]["train_loss"]  # and the mixing is seeded
    assert "cutmix_alpha: 1.0" in (mixed.run_dir / "config.yaml").read_text()
    with pytest.raises(ValueError, match="leave them at 0 with distill"):
        cnn_config(tiny_data, tmp_path / "bad", mixup_alpha=0.2, distill={"targets": str(tmp_path / "t.csv")})
