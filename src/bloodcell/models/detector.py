"""The cell detector: torchvision's FCOS on a timm MobileNetV3 backbone with a feature pyramid.

- FCOS (Tian et al. 2019, ``torchvision.models.detection.FCOS``) is anchor-free: each pyramid
  level predicts, per location, a score for each kind (white cell, red cell, platelet), a
  centre-ness and the distances to the box's sides. Objects are assigned to levels by size,
  so one network covers platelets of 10 px and white cells of 300 px.
- The backbone is the same ImageNet MobileNetV3-Small the classifier starts from
  (``$BLOODCELL_WEIGHTS``), its strides 8, 16 and 32 feeding torchvision's
  ``FeaturePyramidNetwork`` plus a pooled stride-64 level. BatchNorm statistics are frozen,
  as torchvision's detection references freeze them (the weights' BatchNorms are folded).
- :class:`DetectorGraph` is what is exported to ONNX: uint8 letterboxed fields in, every
  location's decoded box and per-kind score out. Thresholds and NMS run after it
  (:mod:`bloodcell.inference.detect`), tested against torchvision's own post-processing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import nn

from ..core.errors import BloodcellError

DETECTOR_SCHEMA = 1
DETECTOR_FILE = "detector.json"


class DetectorContract(BaseModel):
    """What a trained detector needs at prediction time; written as ``detector.json`` beside its weights."""

    schema_version: int = DETECTOR_SCHEMA
    kinds: list[str] = Field(default_factory=lambda: ["white_cell", "red_cell", "platelet"])
    backbone: str = "tf_mobilenetv3_small_100"
    image_size: int = Field(512, ge=64, description="fields are letterboxed to this square side")
    fpn_channels: int = Field(64, ge=32)
    head_convs: int = Field(2, ge=1)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    score_threshold: float = Field(0.3, gt=0, lt=1, description="detections scoring below are dropped")
    kind_thresholds: dict[str, float] = Field(default_factory=dict,
                                              description="per kind, a threshold above score_threshold (chosen on validation fields)")
    nms_iou: float = Field(0.5, gt=0, le=1, description="boxes of one kind overlapping more are suppressed")
    cross_kind_iou: float = Field(0.7, gt=0, le=1, description="boxes of two kinds overlapping more: the lower-scoring one goes")
    nested: dict[str, float] = Field(
        default_factory=lambda: {"white_cell": 0.7},
        description="per kind: a box sharing this much of the smaller box's area with a higher-scoring box of its kind goes "
                    "(a nucleus lobe beside its whole cell, or a second, larger box round it: their IoU is too small for NMS)")
    max_detections: int = Field(300, ge=1)
    red_cell_side: float | None = Field(
        None, gt=0, description="median red-cell box side, in letterbox pixels, over the training fields: the ruler "
        "for fields taken at another magnification (None: every field is read at the letterbox scale alone)")
    magnify_below: float = Field(
        0.7, gt=0, lt=1, description="a field whose red cells come out smaller than this share of red_cell_side is "
        "read again on overlapping tiles, magnified to bring them to red_cell_side")
    crowded_cover: float = Field(
        0.4, gt=0, le=1, description="red cells covering at least this share of a field make it crowded: their "
        "number tells the network the cells' size, so it reads them well at lower magnifications")
    crowded_magnify_below: float = Field(
        0.45, gt=0, lt=1, description="magnify_below for a crowded field")
    white_cell_min_stain: float = Field(
        0.05, ge=0, le=1, description="a white cell has a stained nucleus: a white-cell box whose area the field's "
        "most stained pixels (the framing's stain mask) cover less than this share of is dropped (0: off)")
    trained_on: dict = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def operating(self) -> dict[str, float]:
        """Each kind's threshold by name (what ``evaluation.detection_metrics`` takes as ``operating``)."""
        return dict(zip(self.kinds, self.thresholds()))

    def lowered(self, threshold: float = 0.05) -> DetectorContract:
        """The same detector keeping every detection down to ``threshold`` (to rank them all for AP)."""
        return self.model_copy(update={"score_threshold": threshold, "kind_thresholds": {}})

    def thresholds(self) -> list[float]:
        """Each kind's score threshold, in the order of ``kinds``."""
        return [max(self.score_threshold, self.kind_thresholds.get(kind, 0.0)) for kind in self.kinds]


def read_detector_contract(path: str | Path) -> DetectorContract:
    path = Path(path)
    file = path / DETECTOR_FILE if path.is_dir() else path
    if not file.is_file():
        raise BloodcellError(f"{path}: not a bloodcell detector (no {DETECTOR_FILE})")
    try:
        contract = DetectorContract.model_validate_json(file.read_text())
    except Exception as exc:  # noqa: BLE001 - pydantic and JSON errors
        raise BloodcellError(f"{file}: not a valid detector contract ({str(exc).splitlines()[0]})") from None
    if contract.schema_version > DETECTOR_SCHEMA:
        raise BloodcellError(f"{file}: detector schema {contract.schema_version} is newer than this bloodcell "
                             f"reads ({DETECTOR_SCHEMA}); upgrade bloodcell")
    return contract


class PyramidBackbone(nn.Module):
    """timm features at strides 8, 16, 32 -> FPN (P3-P5) plus a max-pooled P6; torchvision's backbone protocol."""

    def __init__(self, name: str, channels: int, weights: str | Path | None = None):
        super().__init__()
        import timm
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        kwargs = {}
        if weights is not None:
            if not Path(weights).is_file():
                raise BloodcellError(f"{weights}: backbone weights not found")
            kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(weights)}}
        quiet = logging.getLogger("timm")  # its note that the ImageNet classifier's weights go unused
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.body = timm.create_model(name, features_only=True, out_indices=(2, 3, 4), **kwargs)
        finally:
            quiet.setLevel(level)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.body.modules():  # frozen statistics: batches of a few fields are too small
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def build_detector(contract: DetectorContract, weights: str | Path | None = None) -> nn.Module:
    """torchvision FCOS over :class:`PyramidBackbone`; fields come in at their final size (no resize inside)."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class NoResize(GeneralizedRCNNTransform):
        def resize(self, image, target=None):
            return image, target

    backbone = PyramidBackbone(contract.backbone, contract.fpn_channels, weights)
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,)), ((1.0,),) * 4)  # one point per location, size = stride
    head = FCOSHead(contract.fpn_channels, 1, len(contract.kinds), num_convs=contract.head_convs)
    model = FCOS(backbone, len(contract.kinds), anchor_generator=anchors, head=head,
                 image_mean=list(contract.mean), image_std=list(contract.std),
                 score_thresh=contract.score_threshold, nms_thresh=contract.nms_iou,
                 detections_per_img=contract.max_detections)
    model.transform = NoResize(contract.image_size, contract.image_size, list(contract.mean), list(contract.std))
    return model


class DetectorGraph(nn.Module):
    """uint8 (N, 3, S, S) letterboxed fields -> boxes (N, A, 4) in canvas pixels and scores (N, A, kinds).

    The score is FCOS's: sqrt(sigmoid(class logit) * sigmoid(centre-ness)), as torchvision scores.
    """

    def __init__(self, fcos: nn.Module, contract: DetectorContract):
        super().__init__()
        from torchvision.models.detection.image_list import ImageList

        self.fcos = fcos
        size = contract.image_size
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(contract.std))).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(contract.mean) / torch.tensor(contract.std)).view(1, 3, 1, 1))
        with torch.no_grad():
            dummy = torch.zeros(1, 3, size, size)
            features = list(fcos.backbone(dummy).values())
            anchors = fcos.anchor_generator(ImageList(dummy, [(size, size)]), features)[0]
        self.register_buffer("centres", ((anchors[:, :2] + anchors[:, 2:]) / 2)[None])
        self.register_buffer("sizes", (anchors[:, 2:] - anchors[:, :2])[None])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() * self.scale - self.shift
        out = self.fcos.head(list(self.fcos.backbone(x).values()))
        reg = out["bbox_regression"] * self.sizes.repeat(1, 1, 2)  # (left, top, right, bottom) in pixels
        boxes = torch.cat([self.centres - reg[..., :2], self.centres + reg[..., 2:]], dim=-1)
        scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
        return boxes, scores


def load_detector_graph(path: str | Path, checkpoint: str = "best.safetensors") -> DetectorGraph:
    """A trained detector's exportable graph, in eval mode, from a run directory."""
    from .checkpoint import load_checkpoint

    path = Path(path)
    contract = read_detector_contract(path)
    tensors, _ = load_checkpoint(path / checkpoint)
    model = build_detector(contract)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise BloodcellError(f"{path / checkpoint}: does not fit the detector its {DETECTOR_FILE} describes "
                             f"({str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc})") from None
    return DetectorGraph(model.eval(), contract).eval()
