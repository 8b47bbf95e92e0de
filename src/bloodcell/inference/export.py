"""ONNX export: static padding merged into the convolutions, the contract in the metadata, optional int8."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..core.errors import BloodcellError, ImageReadError
from ..core.extras import require
from ..data import check_source, load_item, preprocess
from ..models import ClassifierWithShift, freeze_same_padding, load_model, load_shift_head
from .predictor import load_predictor


def check_set(path: str | Path, limit: int = 256) -> tuple[list[np.ndarray], list[str]]:
    """Up to ``limit`` labelled images, evenly spaced, to check an export against PyTorch.

    A split dataset gives its validation split; any other dataset is used as it is.
    """
    source = check_source(path)
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
    onnx = require("onnx", "ONNX export")
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


def int8_weight_type():
    """The int8 models' weight type: unsigned 8 bits.

    Unsigned 8-bit weights: U8U8 kernels accumulate without saturating on every x86 CPU.

    ONNX Runtime runs U8S8 (uint8 activations, int8 weights) with VPMADDUBSW on AVX2 and
    AVX-512 CPUs without VNNI, whose 16-bit intermediate sums can saturate; with VNNI they do
    not. So U8S8 answers depend on the CPU (measured: dynamic int8 agreement 0.83 on an
    AVX2-only EPYC, above 0.9 on a VNNI one). ONNX Runtime's quantization guide names U8U8
    as the remedy; its integer sums are exact everywhere.
    """
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8


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
                    activation_type=QuantType.QUInt8, weight_type=int8_weight_type(),
                    nodes_to_exclude=exclude or [])


def nodes_after_classifier(model: Path) -> list[str]:
    """The nodes between the last fully connected layer and the output: a subclass model's merge.

    They stay in float: the merge adds -1e4 to the logits of other classes' subclasses, and
    one uint8 range spanning -1e4..10 rounds every logit to the same value (measured: static
    int8 of run 17 agreed with the float model on 16% of images until they were excluded).
    """
    onnx = require("onnx", "int8 export")

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


def nodes_only_for(model: Path, output: str) -> list[str]:
    """The nodes that feed ``output`` and no other output: the out-of-distribution score's own graph.

    They stay in float under int8: the score is a Mahalanobis distance, a difference of large
    quadratic terms that 8-bit ranges would swamp.
    """
    onnx = require("onnx", "int8 export")

    graph = onnx.load(str(model)).graph
    producer = {name: node for node in graph.node for name in node.output}

    def ancestors(name: str) -> set[str]:
        seen: set[str] = set()
        pending = [name]
        while pending:
            node = producer.get(pending.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            pending.extend(node.input)
        return seen

    others: set[str] = set()
    for other in graph.output:
        if other.name != output:
            others |= ancestors(other.name)
    return sorted(ancestors(output) - others)


def export_onnx(model: str | Path, out: str | Path, check_images: list[np.ndarray] | None = None,
                quantize: bool | str = False, check_labels: list[str] | None = None) -> dict:
    """Export a trained run to ONNX (dynamic batch, uint8 input, contract in the metadata).

    Checks afterwards that ONNX Runtime and PyTorch agree on ``check_images``
    and returns the largest probability difference; with ``check_labels`` (class
    names) it also reports the accuracy of each model, so the cost of int8 is measured.
    ``quantize``: 'dynamic' (or True) quantises the fully connected layers; 'static'
    quantises everything, calibrated on half of ``check_images`` and scored on the other half.
    """
    onnx = require("onnx", "ONNX export")
    import torch

    net, contract = load_model(model)
    shift_head = load_shift_head(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = contract.image_size
    # The exported model has one input size, so timm's run-time 'SAME' padding becomes constant ...
    frozen = freeze_same_padding(net, size)
    example = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    exported, outputs = net, ["logits"]
    if shift_head is not None:  # the out-of-distribution score travels in the same graph
        exported, outputs = ClassifierWithShift(net, shift_head).eval(), ["logits", "ood_score"]
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / "traced.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter's notes on constant folding and its own deprecation
            warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            # per-image normalisation (train.per_image_norm) uses each image's statistics by design
            warnings.filterwarnings("ignore", message=".*'instance_norm' is set to train=True.*")
            torch.onnx.export(exported, (example,), str(traced), input_names=["images"], output_names=outputs,
                              dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
                              opset_version=17, dynamo=False)
        graph, merged = fuse_zero_padding(traced, Path(tmp) / "folded.onnx")  # ... and merges into the convolutions
    graph.metadata_props.append(onnx.StringStringEntryProto(key="bloodcell", value=contract.model_dump_json()))
    onnx.save(graph, str(out))
    report = {"onnx": str(out), "bytes": out.stat().st_size, "same_padding_frozen": frozen, "pads_merged": merged,
              "outputs": outputs}
    float_only = nodes_only_for(out, "ood_score") if shift_head is not None else []
    mode = {False: None, None: None, True: "dynamic", "dynamic": "dynamic", "static": "static"}.get(quantize, "?")
    if mode == "?":
        raise BloodcellError(f"quantize={quantize!r}: use 'dynamic' or 'static'")
    measured = list(range(len(check_images or [])))  # the check images that score the int8 model
    if mode is not None:
        quantized = out.with_name(out.stem + ".int8.onnx")
        if mode == "dynamic":
            from onnxruntime.quantization import quantize_dynamic

            # Only the fully connected layers: dynamic int8 convolutions (ConvInteger) were
            # measured here at 0% agreement with the float model and 9x slower on MobileNetV3.
            quantize_dynamic(str(out), str(quantized), weight_type=int8_weight_type(),
                             op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=float_only)
        else:
            if not check_images or len(check_images) < 16:
                raise BloodcellError("static int8 needs calibration images: pass --check with 16 or more images")
            # Calibrate activation ranges on half of the check images; score on the other half.
            measured = measured[1::2]
            # A subclass model's merge stays float; a plain model is quantized whole, as before.
            _quantize_static(out, quantized, check_images[::2], size, contract.framing,
                             (nodes_after_classifier(out) if contract.subclasses else []) + float_only)
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
