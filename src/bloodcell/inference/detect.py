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
from ..data.fields import KINDS, Boxes, box_overlap, field_of_view, letterbox
from ..data.framing import stain_mask, stain_score
from ..models.detector import DETECTOR_FILE, DetectorContract, read_detector_contract

DEFAULT_DETECTOR = "default"
ONNX_FILE = "detector.onnx"
TOPK_CANDIDATES = 1000
# Reading fields taken at a lower magnification than the training fields (CellDetector.magnified):
RULER_SCORE = 0.3  # red cells scoring at least this measure the field's magnification
RULER_CELLS = 3  # and at least this many of them
MIN_MAGNIFICATION, MAX_MAGNIFICATION = 1.5, 6.0  # the range tried, relative to the letterboxed field
MAX_MAGNIFIED_READINGS = 2
TILE_OVERLAP = 0.5  # of a tile's side: a white cell (about twice a red cell) is whole in one tile
TILE_BATCH = 8
MIN_TILE = 64  # field pixels: a smaller tile is not magnified further (a small image is read as it is)


@dataclass
class Detections:
    """Cells found in one field: boxes in the field's own pixels, kind indices into :data:`KINDS`, scores."""

    boxes: Boxes
    scores: np.ndarray
    magnification: float = 1.0  # how much more than the letterboxed field it was read at (CellDetector.magnified)

    def __len__(self) -> int:
        return len(self.scores)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (n, 4) and (m, 4) xyxy boxes (``torchvision.ops.box_iou``)."""
    return box_overlap(a, b, "union")


NMS_BLOCK = 256  # boxes whose suppression rows are computed at once: memory NMS_BLOCK x boxes, not boxes^2


def greedy_keep(count: int, suppresses, block: int = NMS_BLOCK) -> np.ndarray:
    """Greedy suppression over ``count`` boxes ranked best first; returns the positions kept (in rank order).

    ``suppresses(rows, cols)`` gives the boolean matrix saying box ``rows[a]`` removes box ``cols[b]``
    (when ``rows[a]`` is kept and ranks before ``cols[b]``). It is asked for blocks of rows at a time,
    so a field read on many tiles (tens of thousands of boxes) needs memory for ``block`` rows only;
    the answer is the one-matrix greedy's (tested).
    """
    dropped = np.zeros(count, bool)
    for start in range(0, count, block):
        stop = min(start + block, count)
        rows = np.arange(start, stop)
        inside = suppresses(rows, rows)
        for i in range(stop - start):
            if not dropped[start + i]:
                dropped[start + i + 1 : stop] |= inside[i, i + 1 :]
        kept = rows[~dropped[start:stop]]
        if stop < count and len(kept):
            dropped[stop:] |= suppresses(kept, np.arange(stop, count)).any(axis=0)
    return np.flatnonzero(~dropped)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first (``torchvision.ops.nms``)."""
    order = np.argsort(-scores, kind="stable")
    ranked = boxes[order]
    return order[greedy_keep(len(order), lambda r, c: box_iou(ranked[r], ranked[c]) > iou)]


def nested_suppression(boxes: np.ndarray, scores: np.ndarray, share: float) -> np.ndarray:
    """Indices kept, highest score first, when boxes sharing ``share`` of the smaller one's area suppress each other.

    NMS by intersection over the smaller box instead of IoU (Bodla et al.'s IoMin): a box inside
    another, or round it, is one cell found twice.
    """
    order = np.argsort(-scores, kind="stable")
    ranked = boxes[order]
    return order[greedy_keep(len(order), lambda r, c: box_overlap(ranked[r], ranked[c], "smaller") >= share)]


def postprocess(boxes: np.ndarray, scores: np.ndarray, contract: DetectorContract) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One field's (A, 4) boxes and (A, kinds) scores -> kept boxes, kinds and scores, best first."""
    locations, kinds = np.nonzero(scores > np.asarray(contract.thresholds(), np.float32))
    values = scores[locations, kinds]
    if len(values) > TOPK_CANDIDATES:  # as torchvision's topk_candidates: NMS is quadratic
        best = np.argsort(-values, kind="stable")[:TOPK_CANDIDATES]
        locations, kinds, values = locations[best], kinds[best], values[best]
    candidates = np.clip(boxes[locations], 0, contract.image_size)  # as torchvision clips to the image
    return suppress(candidates, kinds, values, contract)


def suppress(candidates: np.ndarray, kinds: np.ndarray, values: np.ndarray,
             contract: DetectorContract) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-kind NMS, nested suppression, the detection cap and cross-kind suppression, over scored boxes
    (kinds index ``contract.kinds``); kept boxes, kinds and scores, best first."""
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
        kept_rank = greedy_keep(len(keep), lambda r, c: (box_iou(out_boxes[r], out_boxes[c]) > contract.cross_kind_iou)
                                & (out_kinds[r][:, None] != out_kinds[c][None, :]))
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

    def with_contract(self, contract: DetectorContract) -> CellDetector:
        """The same network read under another contract (e.g. ``contract.lowered()``, to rank every detection)."""
        return CellDetector(self._run, contract)

    def detect_batch(self, images: list[np.ndarray], views: list | None = None) -> list[Detections]:
        """Each field read at the letterbox scale; one whose red cells come out too small to read (a lower
        magnification than training's) is read again, magnified, on overlapping tiles (:meth:`magnified`).

        A photo showing the smear inside a dark surround (through the eyepiece) is read on the smear
        alone (:func:`bloodcell.data.fields.field_of_view`; ``views``: its answers, where the caller has
        them already); boxes are in the photo's own pixels.
        """
        views = [field_of_view(image) for image in images] if views is None else views
        images = [image if view is None else view[0][view[1][1] : view[1][3], view[1][0] : view[1][2]]
                  for image, view in zip(images, views)]
        framed: list = []
        found = self._letterboxed(images, framed)
        if self.contract.red_cell_side is not None:
            for index, (image, detections) in enumerate(zip(images, found)):
                found[index] = self.magnified(image, detections)
        if self.contract.white_cell_min_stain > 0:
            found = [self.nucleated(f, canvas, frame) for f, (canvas, frame) in zip(found, framed)]
        for index, view in enumerate(views):
            if view is not None and (view[1][0] or view[1][1]):
                shift = np.array([view[1][0], view[1][1]] * 2, np.float32)
                f = found[index]
                found[index] = Detections(Boxes(f.boxes.xyxy + shift, f.boxes.kinds), f.scores, f.magnification)
        return found

    def _letterboxed(self, images: list[np.ndarray], framed: list | None = None) -> list[Detections]:
        """Detections of each image read whole at the letterbox scale; ``framed`` receives each (canvas, frame)."""
        if not images:
            return []
        size = self.contract.image_size
        letterboxed = [letterbox(image, size) for image in images]
        if framed is not None:
            framed.extend(letterboxed)
        canvases = np.stack([c for c, _ in letterboxed]).transpose(0, 3, 1, 2)
        boxes, scores = self._run(np.ascontiguousarray(canvases))
        found = []
        for image, (_, frame), b, s in zip(images, letterboxed, boxes, scores):
            kept, kinds, values = postprocess(b, s, self.contract)
            kinds = np.asarray([KINDS.index(self.contract.kinds[k]) for k in kinds], np.int64)
            original = frame.to_original(kept, image.shape[1], image.shape[0])
            found.append(Detections(Boxes(original, kinds), values))
        return found

    def nucleated(self, detections: Detections, canvas: np.ndarray, frame) -> Detections:
        """``detections`` less the white-cell boxes holding too few stained pixels to hold a nucleus.

        The stain mask is the framing's (:mod:`bloodcell.data.framing`): the field's stain score above
        the midpoint of its median and 99.5th percentile, on the letterboxed canvas. Another lab's pale
        red cells and empty background, read as white cells, hold almost none of it (docs/experiments.md,
        nineteenth session).
        """
        white = np.flatnonzero(detections.boxes.kinds == KINDS.index("white_cell"))
        if not len(white):
            return detections
        from scipy import ndimage

        mask = stain_mask(ndimage.uniform_filter(stain_score(canvas[None]), size=(1, 3, 3)))[0]
        keep = np.ones(len(detections), bool)
        xyxy = detections.boxes.xyxy[white] * frame.scale + np.array([frame.left, frame.top] * 2, np.float32)
        for index, (x0, y0, x1, y1) in zip(white, xyxy):
            inside = mask[max(int(y0), 0) : max(int(np.ceil(y1)), 0), max(int(x0), 0) : max(int(np.ceil(x1)), 0)]
            keep[index] = inside.size > 0 and inside.mean() >= self.contract.white_cell_min_stain
        if keep.all():
            return detections
        return Detections(detections.boxes.select(keep), detections.scores[keep], detections.magnification)

    @staticmethod
    def _ruler_cells(detections: Detections) -> np.ndarray:
        """The boxes (xyxy) of the red cells that measure a field: those scoring at least RULER_SCORE."""
        red = (detections.boxes.kinds == KINDS.index("red_cell")) & (detections.scores >= RULER_SCORE)
        return detections.boxes.xyxy[red]

    def ruler(self, detections: Detections, side: float) -> float | None:
        """The median side of the red cells found (score >= RULER_SCORE), in the letterbox pixels of a
        window ``side`` field pixels across; None with fewer than RULER_CELLS of them."""
        xyxy = self._ruler_cells(detections)
        if len(xyxy) < RULER_CELLS:
            return None
        return float(np.median(np.maximum(xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]))) * self.contract.image_size / side

    def red_cover(self, detections: Detections, shape: tuple[int, ...]) -> float:
        """The share of a field's area under the red cells found (score >= RULER_SCORE; overlaps counted twice)."""
        xyxy = self._ruler_cells(detections)
        return float(((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])).sum()) / max(shape[0] * shape[1], 1)

    def magnified(self, image: np.ndarray, detections: Detections) -> Detections:
        """``detections`` of the whole field, or, where its red cells read smaller than ``magnify_below`` of
        the training fields' (``red_cell_side``), the field read again on tiles magnified to bring them there.

        Red cells are the ruler: they are the commonest cell of every field and nearly the same size
        in every blood (7-8 um). A field with too few red cells found is tried at twice the
        magnification. Of the readings made (at most three), the one whose red cells come closest to
        the training size is kept. A crowded field (red cells over ``crowded_cover`` of it) is
        magnified only below ``crowded_magnify_below``: there the network reads white cells as well
        without tiles down to a third of the magnification (docs/experiments.md, eighteenth session).
        """
        reference, longer = self.contract.red_cell_side, max(image.shape[:2])
        size = self.ruler(detections, longer)
        crowded = self.red_cover(detections, image.shape) >= self.contract.crowded_cover
        below = self.contract.crowded_magnify_below if crowded else self.contract.magnify_below
        readings = [(size, detections)]
        magnification = 1.0
        for _ in range(MAX_MAGNIFIED_READINGS):
            if size is not None and size >= below * reference:
                break
            # the red cells' size says how much more to magnify; none found says: try twice as much
            wanted = magnification * (reference / size if size is not None else 2.0)
            wanted = min(MAX_MAGNIFICATION, max(MIN_MAGNIFICATION, wanted))
            if wanted <= magnification or longer / wanted < MIN_TILE:
                break  # no more to gain, or tiles too few pixels across to hold a cell
            magnification = wanted
            window = longer / magnification
            tiled = self._tiled(image, window, magnification)
            size = self.ruler(tiled, window)
            readings.append((size, tiled))
        measured = [(size, found) for size, found in readings if size is not None]
        if not measured:
            return detections
        return min(measured, key=lambda reading: abs(np.log(reading[0] / reference)))[1]

    def _tiled(self, image: np.ndarray, window: float, magnification: float) -> Detections:
        """Detections over square tiles ``window`` pixels across (``magnification`` times the letterboxed
        field), overlapping by TILE_OVERLAP, merged.

        A box touching a tile's edge inside the field is a cell cut by the tile: a neighbouring tile,
        which it overlaps, holds it whole.
        """
        height, width = image.shape[:2]
        side = max(2, round(window))

        def starts(extent: int) -> list[int]:
            if extent <= side:
                return [0]
            count = int(np.ceil((extent - side) / (side * (1 - TILE_OVERLAP)))) + 1
            return [round(i * (extent - side) / (count - 1)) for i in range(count)]

        offsets = [(x, y) for y in starts(height) for x in starts(width)]
        tiles = [image[y : y + side, x : x + side] for x, y in offsets]
        boxes, kinds, scores = [], [], []
        for start in range(0, len(tiles), TILE_BATCH):
            for (x, y), tile, found in zip(offsets[start:], tiles[start : start + TILE_BATCH],
                                           self._letterboxed(tiles[start : start + TILE_BATCH])):
                th, tw = tile.shape[:2]
                xyxy = found.boxes.xyxy
                cut = (((xyxy[:, 0] <= 1) & (x > 0)) | ((xyxy[:, 1] <= 1) & (y > 0))
                       | ((xyxy[:, 2] >= tw - 1) & (x + tw < width)) | ((xyxy[:, 3] >= th - 1) & (y + th < height)))
                boxes.append(xyxy[~cut] + np.array([x, y, x, y], np.float32))
                kinds.append(found.boxes.kinds[~cut])
                scores.append(found.scores[~cut])
        own = np.asarray([self.contract.kinds.index(KINDS[k]) for k in np.concatenate(kinds)], np.int64)
        kept, own, values = suppress(np.concatenate(boxes), own, np.concatenate(scores), self.contract)
        return Detections(Boxes(kept, np.asarray([KINDS.index(self.contract.kinds[k]) for k in own], np.int64)), values,
                          round(magnification, 2))

    def detect(self, image: np.ndarray) -> Detections:
        return self.detect_batch([image])[0]


def load_detector(detector: str | Path | CellDetector = DEFAULT_DETECTOR, backend: str = "auto",
                  threads: int | None = None) -> CellDetector:
    """A detector directory (or ``default``): ONNX Runtime when ``detector.onnx`` is there, else PyTorch.
    A detector already loaded is returned as it is."""
    if isinstance(detector, CellDetector):
        return detector
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


def load_once(detector: str | Path | CellDetector = DEFAULT_DETECTOR) -> str | Path | CellDetector:
    """``detector`` loaded, for a command that looks at a sample of images and then reads them with the
    same detector (one session, not one per use); as given where it cannot be loaded, so that each use
    says why as it did."""
    try:
        return load_detector(detector)
    except BloodcellError:
        return detector


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
