"""Prediction and ONNX export.

A :class:`Predictor` holds one model and its preprocessing contract (class
names, input size, temperature; normalisation is inside the network) and runs
it with ONNX Runtime when the model is an exported ``.onnx`` file, or PyTorch
otherwise.  Files are decoded on threads and resized by the one
:func:`bloodcell.data.preprocess`, exactly as in training.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import IMAGE_EXTENSIONS, BloodcellError, ImageReadError, decode_file, open_source, load_item, preprocess

WHITE_CELLS = ("basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil")
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


@dataclass
class Predictor:
    class_names: list[str]
    image_size: int
    temperature: float
    backend: str  # "onnxruntime" or "torch"
    run: Callable[[np.ndarray], np.ndarray]  # uint8 (N, 3, S, S) -> logits (N, C)
    source: str
    info: dict = field(default_factory=dict)

    @property
    def framing(self) -> dict | None:
        """The cell-framing step of the model's preprocessing (None: the whole image is resized)."""
        return self.info.get("framing")

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """A decoded RGB uint8 image as this model sees it (framed, resized), H x W x 3."""
        return preprocess(image, self.image_size, self.framing)

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """Class probabilities for decoded RGB uint8 images of any size."""
        if not images:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return self.prepared_probabilities(np.stack([self.prepare(image) for image in images]).transpose(0, 3, 1, 2))

    def prepared_probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a uint8 (N, 3, S, S) batch already prepared as this model sees it."""
        logits = self.run(np.ascontiguousarray(batch)) / self.temperature
        logits = logits - logits.max(1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(1, keepdims=True)


def onnx_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # One thread per call: a small CNN's layers are too small to split well, so
    # parallel calls on chunks of the batch go faster than one call on two threads
    # (benchmarks/inference.py: 3,351 vs 2,277 images/s on 2 cores).
    options.intra_op_num_threads = threads
    # Do not spin idle threads: torch may share the process (see the project brief).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class ParallelRunner:
    """Run a batch through one ONNX Runtime session as chunks on a few threads at once.

    ``InferenceSession.run`` is thread-safe and releases the GIL, so each chunk
    uses its own core; the service's concurrent requests share the same session.
    """

    def __init__(self, session, chunk: int = 16, workers: int | None = None):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.chunk = chunk
        self.pool = ThreadPoolExecutor(max_workers=workers or max(os.cpu_count() or 1, 1))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) <= self.chunk:
            return self._run(batch)
        parts = [batch[i : i + self.chunk] for i in range(0, len(batch), self.chunk)]
        return np.concatenate(list(self.pool.map(self._run, parts)))


def load_predictor(model: str | Path) -> Predictor:
    """``model``: an exported .onnx file, a run directory, a checkpoint in one, or 'default'."""
    if str(model) == "default":
        model = DEFAULT_MODEL_DIR / "model.onnx"
        if not model.is_file():
            raise BloodcellError("no default model ships with this installation yet; pass --model RUN_DIR or model.onnx")
    path = Path(model)
    if not path.exists():
        raise BloodcellError(f"{path}: model not found")
    if path.suffix == ".onnx":
        try:
            session = onnx_session(path)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise BloodcellError(f"{path}: not a loadable ONNX model ({exc})") from None
        meta = session.get_modelmeta().custom_metadata_map
        if "bloodcell" not in meta:
            raise BloodcellError(f"{path}: no bloodcell metadata; export it with `bloodcell export`")
        contract = json.loads(meta["bloodcell"])
        return Predictor(contract["class_names"], contract["image_size"], contract.get("temperature", 1.0),
                         "onnxruntime", ParallelRunner(session), str(path), contract)
    import torch

    from .evaluate import load_model

    net, meta = load_model(path)
    torch_model = net.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            tensor = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            return torch_model(tensor).numpy()

    predictor = Predictor(meta["class_names"], meta["image_size"], meta.get("temperature", 1.0), "torch", run, str(path), meta)
    predictor.info["torch_model"] = torch_model
    return predictor


# ---------------------------------------------------------------- batch prediction


def collect_inputs(paths: Iterable[str | Path]) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """Expand files, folders (recursive) and .npz files into items to predict; list what was refused."""
    items: list[tuple[str, object]] = []
    bad: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            bad.append((str(path), "no such file or folder"))
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                if file.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append((str(file), file))
        elif path.suffix.lower() == ".npz":
            try:
                source = open_source(path)
            except BloodcellError as exc:
                bad.append((str(path), str(exc)))
                continue
            items += [(item.path, (source, item)) for item in source.items]
        else:
            items.append((str(path), path))
    return items, bad


def _decode(entry) -> np.ndarray:
    if isinstance(entry, tuple):
        return load_item(*entry)[0]
    return decode_file(entry)[0]


def predict_paths(predictor: Predictor, paths: Iterable[str | Path], batch_size: int = 64, workers: int = 2,
                  abstain_below: float = 0.0, progress: Callable[[int], None] | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Predict every readable image under ``paths``; returns (rows, [(path, reason) refused])."""
    items, bad = collect_inputs(paths)
    rows: list[dict] = []

    def load(entry):
        try:
            return _decode(entry)
        except (ImageReadError, BloodcellError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            decoded = list(pool.map(load, [entry for _, entry in chunk]))
            good = [(name, image) for (name, _), image in zip(chunk, decoded) if not isinstance(image, Exception)]
            bad += [(name, str(image)) for (name, _), image in zip(chunk, decoded) if isinstance(image, Exception)]
            probs = predictor.probabilities([image for _, image in good])
            for (name, _), row in zip(good, probs):
                confidence = float(row.max())
                rows.append({"path": name, "pred": predictor.class_names[int(row.argmax())],
                             "confidence": round(confidence, 6), "abstained": confidence < abstain_below,
                             **{c: round(float(p), 6) for c, p in zip(predictor.class_names, row)}})
            if progress:
                progress(len(chunk))
    return rows, bad


def differential_count(rows: list[dict], include_abstained: bool = False) -> dict:
    """A hematologist's differential: white cells as percentages of white cells; platelets and erythroblasts apart."""
    counts = Counter(r["pred"] for r in rows if include_abstained or not r["abstained"])
    white = sum(counts.get(c, 0) for c in WHITE_CELLS)
    return {
        "white_cells": white,
        "white_cell_percent": {c: round(100 * counts.get(c, 0) / white, 1) if white else 0.0 for c in WHITE_CELLS},
        "platelets": counts.get("platelet", 0),
        "erythroblasts": counts.get("erythroblast", 0),
        "erythroblasts_per_100_white_cells": round(100 * counts.get("erythroblast", 0) / white, 1) if white else None,
        "abstained": sum(1 for r in rows if r["abstained"]),
        "counts": dict(counts),
    }


def write_predictions(rows: list[dict], class_names: list[str], out: Path, fmt: str = "csv") -> None:
    if fmt == "json":
        out.write_text(json.dumps(rows, indent=1))
        return
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "pred", "confidence", "abstained", *class_names])
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- export


def check_set(path: str | Path, limit: int = 256) -> tuple[list[np.ndarray], list[str]]:
    """Up to ``limit`` labelled images, evenly spaced, to check an export against PyTorch.

    A curated folder gives its validation split; any other dataset is used as it is.
    """
    path = Path(path)
    target = path / "images" / "val" if (path / "images" / "val").is_dir() else path
    source = open_source(target)
    images, labels = [], []
    for item in source.items[:: max(len(source.items) // max(limit, 1), 1)][:limit]:
        try:
            images.append(load_item(source, item)[0])
        except ImageReadError:
            continue  # curation lists unreadable files; the check uses the rest
        labels.append(source.label_name(item.label))
    return images, labels


def fuse_zero_padding(src: Path, work: Path):
    """Fold constants, then merge each zero ``Pad`` into the ``Conv`` it feeds.

    Returns the checked model (an ``onnx.ModelProto``, not yet saved) and how many
    Pad nodes were merged; ``work`` is a scratch file for ONNX Runtime's folding.

    ONNX ``Conv`` takes separate begin/end pads, so TensorFlow-style asymmetric
    'SAME' padding needs no ``Pad`` node, which ONNX Runtime runs as a separate
    copy of the whole feature map: on MobileNetV3-Small 128 px the five of them took
    29% of the run time (ONNX Runtime's profiler).
    Only standard ONNX is written (ONNX Runtime's basic, portable optimisations).
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # constant folding
    options.optimized_model_filepath = str(work)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(work))
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    merged = []
    for node in graph.node:
        if node.op_type != "Pad" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        pads = constants[node.input[1]]
        value = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else 0
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        after = users.get(node.output[0], [])
        if (mode != b"constant" or value is None or np.any(value != 0) or len(after) != 1 or after[0].op_type != "Conv"
                or len(pads) != 8 or np.any(pads < 0) or np.any(pads[[0, 1, 4, 5]] != 0)):
            continue  # only zero padding of the spatial axes of a 4-D input is what Conv's pads express
        conv = after[0]
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
            continue
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        new = [old[0] + int(pads[2]), old[1] + int(pads[3]), old[2] + int(pads[6]), old[3] + int(pads[7])]
        for attribute in [a for a in conv.attribute if a.name in ("pads", "auto_pad")]:
            conv.attribute.remove(attribute)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = node.input[0]
        merged.append(node)
    for node in merged:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    onnx.checker.check_model(model)
    return model, len(merged)


def _quantize_static(model: Path, out: Path, calibration: list[np.ndarray], size: int, framing: dict | None = None,
                     exclude: list[str] | None = None) -> None:
    """int8 weights and activations (QDQ, per-channel), activation ranges from ``calibration``; ``exclude`` stays float."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batch = np.ascontiguousarray(np.stack([preprocess(image, size, framing) for image in calibration]).transpose(0, 3, 1, 2))

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": batch[i : i + 32]} for i in range(0, len(batch), 32)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(model), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude or [])


def nodes_after_classifier(model: Path) -> list[str]:
    """The nodes between the last fully connected layer and the output: a subclass model's merge.

    They stay in float: the merge adds -1e4 to the logits of other classes' subclasses, and
    one uint8 range spanning -1e4..10 rounds every logit to the same value (measured: static
    int8 of run 17 agreed with the float model on 16% of images until they were excluded).
    """
    import onnx

    graph = onnx.load(str(model)).graph
    producer = {name: node for node in graph.node for name in node.output}
    excluded: list[str] = []
    pending = [graph.output[0].name]
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.op_type in ("Gemm", "MatMul") or node.name in excluded:
            continue
        excluded.append(node.name)
        pending.extend(node.input)
    return excluded


def export_onnx(model: str | Path, out: str | Path, check_images: list[np.ndarray] | None = None,
                quantize: bool | str = False, check_labels: list[str] | None = None) -> dict:
    """Export a trained run to ONNX (dynamic batch, uint8 input, contract in the metadata).

    Checks afterwards that ONNX Runtime and PyTorch agree on ``check_images``
    and returns the largest probability difference; with ``check_labels`` (class
    names) it also reports the accuracy of each model, so the cost of int8 is measured.
    ``quantize``: 'dynamic' (or True) quantises the fully connected layers; 'static'
    quantises everything, calibrated on half of ``check_images`` and scored on the other half.
    """
    import onnx
    import torch

    from .evaluate import load_model
    from .models import freeze_same_padding

    net, meta = load_model(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = meta["image_size"]
    # The exported model has one input size, so timm's run-time 'SAME' padding becomes constant ...
    frozen = freeze_same_padding(net, size)
    example = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / "traced.onnx"
        torch.onnx.export(net, (example,), str(traced), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
        graph, merged = fuse_zero_padding(traced, Path(tmp) / "folded.onnx")  # ... and merges into the convolutions
    contract = {k: meta.get(k) for k in ("model", "class_names", "image_size", "mean", "std", "temperature", "resize", "input", "framing",
                                       "subclasses")}
    contract["temperature"] = contract["temperature"] or 1.0
    graph.metadata_props.append(onnx.StringStringEntryProto(key="bloodcell", value=json.dumps(contract)))
    onnx.save(graph, str(out))
    report = {"onnx": str(out), "bytes": out.stat().st_size, "same_padding_frozen": frozen, "pads_merged": merged}
    mode = {False: None, None: None, True: "dynamic", "dynamic": "dynamic", "static": "static"}.get(quantize, "?")
    if mode == "?":
        raise BloodcellError(f"quantize={quantize!r}: use 'dynamic' or 'static'")
    measured = list(range(len(check_images or [])))  # the check images that score the int8 model
    if mode is not None:
        quantized = out.with_name(out.stem + ".int8.onnx")
        if mode == "dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # Only the fully connected layers: dynamic int8 convolutions (ConvInteger) were
            # measured here at 0% agreement with the float model and 9x slower on MobileNetV3.
            quantize_dynamic(str(out), str(quantized), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        else:
            if not check_images or len(check_images) < 16:
                raise BloodcellError("static int8 needs calibration images: pass --check with 16 or more images")
            # Calibrate activation ranges on half of the check images; score on the other half.
            measured = measured[1::2]
            # A subclass model's merge stays float; a plain model is quantized whole, as before.
            _quantize_static(out, quantized, check_images[::2], size, meta.get("framing"),
                             nodes_after_classifier(out) if meta.get("subclasses") else None)
        report["int8_mode"] = mode
        report["onnx_int8"] = str(quantized)
        report["int8_bytes"] = quantized.stat().st_size
    if check_images:
        torch_predictor = load_predictor(model)
        onnx_predictor = load_predictor(out)
        reference = torch_predictor.probabilities(check_images)
        report["max_prob_diff"] = float(np.abs(onnx_predictor.probabilities(check_images) - reference).max())
        report["checked_images"] = len(check_images)
        names = torch_predictor.class_names
        unknown = sorted({c for c in check_labels or [] if c not in names})
        if unknown:
            raise BloodcellError(f"check data has class(es) {', '.join(unknown)} unknown to the model")
        truth = np.array([names.index(c) for c in check_labels]) if check_labels else None
        if truth is not None:
            report["accuracy_onnx"] = float((reference.argmax(1) == truth).mean())
        if mode is not None:
            int8 = load_predictor(report["onnx_int8"]).probabilities([check_images[i] for i in measured])
            reference = reference[measured]
            report["int8_checked_images"] = len(measured)
            report["int8_max_prob_diff"] = float(np.abs(int8 - reference).max())
            report["int8_agreement"] = float((int8.argmax(1) == reference.argmax(1)).mean())
            if truth is not None:
                report["accuracy_int8"] = float((int8.argmax(1) == truth[measured]).mean())
                report["int8_accuracy_change"] = report["accuracy_int8"] - float((reference.argmax(1) == truth[measured]).mean())
    return report
