"""Finding cells in whole fields: the exported detector (ONNX Runtime) or its weights (PyTorch), then NMS.

:class:`CellDetector` letterboxes a field (:func:`bloodcell.data.fields.letterbox`), runs the
network (:class:`bloodcell.models.detector.DetectorGraph`) and keeps, per kind, the boxes
scoring above the contract's threshold that survive non-maximum suppression, as torchvision's
FCOS does (tested against it). A last step drops a box that overlaps a higher-scoring box of
another kind by more than ``cross_kind_iou``: one cell is counted once.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..core.errors import BloodcellError
from ..data.fields import KINDS, Boxes, box_overlap, letterbox
from ..models.detector import DETECTOR_FILE, DetectorContract, read_detector_contract

DEFAULT_DETECTOR = "default"
ONNX_FILE = "detector.onnx"
TOPK_CANDIDATES = 1000


@dataclass
class Detections:
    """Cells found in one field: boxes in the field's own pixels, kind indices into :data:`KINDS`, scores."""

    boxes: Boxes
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (n, 4) and (m, 4) xyxy boxes (``torchvision.ops.box_iou``)."""
    return box_overlap(a, b, "union")


def greedy_keep(suppresses: np.ndarray) -> np.ndarray:
    """Greedy suppression over boxes ranked best first: ``suppresses[i, j]`` says box i removes a later box j.

    Returns the positions (in rank order) of the boxes kept.
    """
    dropped = np.zeros(len(suppresses), bool)
    later = np.triu(np.ones_like(suppresses, dtype=bool), k=1)
    for i in range(len(suppresses)):
        if not dropped[i]:
            dropped |= suppresses[i] & later[i]
    return np.flatnonzero(~dropped)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first (``torchvision.ops.nms``)."""
    order = np.argsort(-scores, kind="stable")
    return order[greedy_keep(box_iou(boxes[order], boxes[order]) > iou)]


def nested_suppression(boxes: np.ndarray, scores: np.ndarray, share: float) -> np.ndarray:
    """Indices kept, highest score first, when boxes sharing ``share`` of the smaller one's area suppress each other.

    NMS by intersection over the smaller box instead of IoU (Bodla et al.'s IoMin): a box inside
    another, or round it, is one cell found twice.
    """
    order = np.argsort(-scores, kind="stable")
    return order[greedy_keep(box_overlap(boxes[order], boxes[order], "smaller") >= share)]


def postprocess(boxes: np.ndarray, scores: np.ndarray, contract: DetectorContract) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One field's (A, 4) boxes and (A, kinds) scores -> kept boxes, kinds and scores, best first."""
    locations, kinds = np.nonzero(scores > np.asarray(contract.thresholds(), np.float32))
    values = scores[locations, kinds]
    if len(values) > TOPK_CANDIDATES:  # as torchvision's topk_candidates: NMS is quadratic
        best = np.argsort(-values, kind="stable")[:TOPK_CANDIDATES]
        locations, kinds, values = locations[best], kinds[best], values[best]
    candidates = np.clip(boxes[locations], 0, contract.image_size)  # as torchvision clips to the image
    kept = []
    for kind in np.unique(kinds):
        index = np.nonzero(kinds == kind)[0]
        index = index[nms(candidates[index], values[index], contract.nms_iou)]
        share = contract.nested.get(contract.kinds[kind])
        if share is not None:
            index = index[nested_suppression(candidates[index], values[index], share)]
        kept.append(index)
    keep = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    keep = keep[np.argsort(-values[keep], kind="stable")][: contract.max_detections]
    out_boxes, out_kinds, out_scores = candidates[keep], kinds[keep], values[keep]
    if contract.cross_kind_iou < 1 and len(keep):  # one cell found as two kinds: the better-scoring one stays
        other_kind = out_kinds[:, None] != out_kinds[None, :]
        kept_rank = greedy_keep((box_iou(out_boxes, out_boxes) > contract.cross_kind_iou) & other_kind)
        out_boxes, out_kinds, out_scores = out_boxes[kept_rank], out_kinds[kept_rank], out_scores[kept_rank]
    return out_boxes.astype(np.float32), out_kinds.astype(np.int64), out_scores.astype(np.float32)


def resolve_detector(detector: str | Path) -> Path:
    """A detector directory; ``default`` is the one shipped with the package."""
    if str(detector) == DEFAULT_DETECTOR:
        path = Path(str(resources.files("bloodcell") / "default_detector"))
        if not (path / DETECTOR_FILE).is_file():
            raise BloodcellError("this installation has no default detector; pass --detector RUN_DIR "
                                 "(train one with `bloodcell train-detector`)")
        return path
    path = Path(detector)
    if not path.exists():
        raise BloodcellError(f"{path}: no such detector directory")
    return path if path.is_dir() else path.parent


class CellDetector:
    """Boxes of white cells, red cells and platelets in whole fields of any size."""

    def __init__(self, run, contract: DetectorContract):
        self._run = run  # uint8 (N, 3, S, S) -> (boxes (N, A, 4), scores (N, A, K))
        self.contract = contract

    def detect_batch(self, images: list[np.ndarray]) -> list[Detections]:
        size = self.contract.image_size
        framed = [letterbox(image, size) for image in images]
        canvases = np.stack([c for c, _ in framed]).transpose(0, 3, 1, 2)
        boxes, scores = self._run(np.ascontiguousarray(canvases))
        found = []
        for image, (_, frame), b, s in zip(images, framed, boxes, scores):
            kept, kinds, values = postprocess(b, s, self.contract)
            kinds = np.asarray([KINDS.index(self.contract.kinds[k]) for k in kinds], np.int64)
            original = frame.to_original(kept, image.shape[1], image.shape[0])
            found.append(Detections(Boxes(original, kinds), values))
        return found

    def detect(self, image: np.ndarray) -> Detections:
        return self.detect_batch([image])[0]


def load_detector(detector: str | Path = DEFAULT_DETECTOR, backend: str = "auto", threads: int | None = None) -> CellDetector:
    """A detector directory (or ``default``): ONNX Runtime when ``detector.onnx`` is there, else PyTorch."""
    path = resolve_detector(detector)
    contract = read_detector_contract(path)
    onnx_path = path / ONNX_FILE
    if backend == "onnx" or (backend == "auto" and onnx_path.is_file()):
        if not onnx_path.is_file():
            raise BloodcellError(f"{path}: no {ONNX_FILE}; export it with `bloodcell export-detector`")
        from .predictor import onnx_session

        session = onnx_session(onnx_path, threads=threads or 2)

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            boxes, scores = session.run(None, {"fields": batch})
            return boxes, scores

        return CellDetector(run, contract)
    import torch

    from ..models.detector import load_detector_graph

    graph = load_detector_graph(path)

    def run_torch(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            boxes, scores = graph(torch.from_numpy(batch))
        return boxes.numpy(), scores.numpy()

    return CellDetector(run_torch, contract)


def export_detector(run_dir: str | Path, out: str | Path | None = None, checkpoint: str = "best.safetensors") -> dict:
    """``detector.onnx`` (dynamic batch, uint8 fields in, boxes and scores out), checked against PyTorch."""
    import tempfile
    import warnings

    import torch

    from ..models.detector import load_detector_graph
    from ..models.padding import freeze_same_padding
    from .export import fuse_zero_padding

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / ONNX_FILE
    graph = load_detector_graph(run_dir, checkpoint)
    size = read_detector_contract(run_dir).image_size
    frozen = freeze_same_padding(graph, size)
    example = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / "traced.onnx"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(graph, (example,), str(traced), input_names=["fields"], output_names=["boxes", "scores"],
                              dynamic_axes={"fields": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
                              opset_version=17, dynamo=False)
        model, merged = fuse_zero_padding(traced, Path(tmp) / "folded.onnx")
        import onnx

        onnx.save(model, str(out))
    from .predictor import onnx_session

    rng = np.random.default_rng(0)
    check = rng.integers(0, 256, (2, 3, size, size), dtype=np.uint8)
    with torch.inference_mode():
        ref_boxes, ref_scores = (t.numpy() for t in graph(torch.from_numpy(check)))
    boxes, scores = onnx_session(out, threads=2).run(None, {"fields": check})
    return {"onnx": str(out), "bytes": out.stat().st_size, "same_padding_frozen": frozen, "pads_merged": merged,
            "max_box_diff": float(np.abs(boxes - ref_boxes).max()), "max_score_diff": float(np.abs(scores - ref_scores).max())}
