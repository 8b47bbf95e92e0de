"""A :class:`Predictor`: one model and its contract, run by ONNX Runtime or PyTorch.

It holds the model's contract (class names, input size, framing, temperature; normalisation
is inside the network) and runs it with ONNX Runtime when the model is an exported ``.onnx``
file, or PyTorch otherwise. Images go through the one :func:`bloodcell.data.preprocess`,
exactly as in training.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.contract import ModelContract, parse_contract
from ..core.errors import BloodcellError
from ..data import preprocess, preprocess_batch

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"


@dataclass
class Predictor:
    contract: ModelContract
    backend: str  # "onnxruntime" or "torch"
    run: Callable[[np.ndarray], np.ndarray]  # uint8 (N, 3, S, S) -> logits (N, C)
    source: str
    torch_model: Any = None  # the PyTorch network, when the backend is torch (Grad-CAM needs it)
    # uint8 (N, 3, S, S) -> (logits (N, C), out-of-distribution scores (N,)); None when the model
    # carries no training-lab statistics (bloodcell.models.shift)
    run_with_shift: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def has_shift(self) -> bool:
        """True when every prediction carries an out-of-distribution score."""
        return self.run_with_shift is not None

    @property
    def class_names(self) -> list[str]:
        return self.contract.class_names

    @property
    def image_size(self) -> int:
        return self.contract.image_size

    @property
    def temperature(self) -> float:
        return self.contract.temperature

    @property
    def framing(self) -> dict | None:
        """The cell-framing step of the model's preprocessing (None: the whole image is resized)."""
        return self.contract.framing

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """A decoded RGB uint8 image as this model sees it (framed, resized), H x W x 3."""
        return preprocess(image, self.image_size, self.framing)

    def prepare_batch(self, images: list[np.ndarray]) -> np.ndarray:
        """Decoded images as one uint8 (N, 3, S, S) network batch."""
        return np.ascontiguousarray(preprocess_batch(images, self.image_size, self.framing).transpose(0, 3, 1, 2))

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """Class probabilities for decoded RGB uint8 images of any size."""
        if not images:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return self.prepared_probabilities(self.prepare_batch(images))

    def prepared_probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a uint8 (N, 3, S, S) batch already prepared as this model sees it."""
        if self.run_with_shift is not None and self.contract.ood_temperature:
            return self.prepared_scores(batch)[0]  # the confidence depends on the shift score
        return self.softmax(self.run(np.ascontiguousarray(batch)))

    def softmax(self, logits: np.ndarray, ood: np.ndarray | None = None) -> np.ndarray:
        """Probabilities at the model's temperature; with out-of-distribution scores and the contract's
        ``ood_temperature`` (gamma), an image scoring s > 1 gets ``temperature * s ** gamma``."""
        scale = np.float32(self.temperature)
        if ood is not None and self.contract.ood_temperature:
            scale = scale * np.maximum(np.asarray(ood, np.float32), 1.0)[:, None] ** np.float32(self.contract.ood_temperature)
        logits = logits / scale
        logits = logits - logits.max(1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(1, keepdims=True)

    def scores(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """(class probabilities, out-of-distribution scores or None) for decoded RGB uint8 images.

        A score above 1 means the image lies farther from the training lab's images, in the
        network's feature space, than 99% of that lab's own held-out images (bloodcell.models.shift).
        """
        if not images:
            return self.prepared_scores(np.zeros((0, 3, self.image_size, self.image_size), dtype=np.uint8))
        return self.prepared_scores(self.prepare_batch(images))

    def prepared_scores(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, out-of-distribution scores or None) for a prepared uint8 (N, 3, S, S) batch."""
        if not len(batch):  # a chunk none of whose files could be read
            return (np.zeros((0, len(self.class_names)), dtype=np.float32),
                    np.zeros(0, dtype=np.float32) if self.has_shift else None)
        batch = np.ascontiguousarray(batch)
        if self.run_with_shift is None:
            return self.softmax(self.run(batch)), None
        logits, ood = self.run_with_shift(batch)
        return self.softmax(logits, ood), ood


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
        self.first_output = session.get_outputs()[0].name
        self.pool = ThreadPoolExecutor(max_workers=workers or max(os.cpu_count() or 1, 1))

    def _run(self, batch: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
        return self.session.run(outputs, {self.input_name: batch})

    def run_outputs(self, batch: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
        """Every named output (default: all) of the whole batch."""
        if len(batch) <= self.chunk:
            return self._run(batch, outputs)
        parts = [batch[i : i + self.chunk] for i in range(0, len(batch), self.chunk)]
        results = list(self.pool.map(lambda part: self._run(part, outputs), parts))
        return [np.concatenate(column) for column in zip(*results)]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The first output (logits) of the whole batch."""
        return self.run_outputs(batch, [self.first_output])[0]


def resolve_model(model: str | Path) -> Path:
    """'default' (the shipped model), an .onnx file, a run directory or a checkpoint in one."""
    if str(model) == "default":
        model = DEFAULT_MODEL_DIR / "model.onnx"
        if not model.is_file():
            raise BloodcellError("no default model ships with this installation; pass --model RUN_DIR or model.onnx")
    path = Path(model)
    if not path.exists():
        raise BloodcellError(f"{path}: model not found")
    return path


def load_predictor(model: str | Path) -> Predictor:
    """``model``: an exported .onnx file, a run directory, a checkpoint in one, or 'default'."""
    path = resolve_model(model)
    if path.suffix == ".onnx":
        try:
            session = onnx_session(path)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise BloodcellError(f"{path}: not a loadable ONNX model ({exc})") from None
        meta = session.get_modelmeta().custom_metadata_map
        if "bloodcell" not in meta:
            raise BloodcellError(f"{path}: no bloodcell metadata; export it with `bloodcell export`")
        contract = parse_contract(meta["bloodcell"], f"{path} (metadata)")
        runner = ParallelRunner(session)
        with_shift = None
        names = [output.name for output in session.get_outputs()]
        if "ood_score" in names:
            def with_shift(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                logits, ood = runner.run_outputs(batch, [names[0], "ood_score"])
                return logits, ood

        return Predictor(contract, "onnxruntime", runner, str(path), run_with_shift=with_shift)
    import torch

    from ..models import load_model, load_shift_head

    net, contract = load_model(path)
    torch_model = net.eval()
    shift_head = load_shift_head(path)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            tensor = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            return torch_model(tensor).numpy()

    def run_with_shift(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            features = torch_model.features(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))
            return torch_model.classify(features).numpy(), shift_head(features).numpy()

    return Predictor(contract, "torch", run, str(path), torch_model,
                     run_with_shift=run_with_shift if shift_head is not None else None)
