"""Detection metrics: average precision per kind at IoU 0.5 (PASCAL VOC, all points), recall, counts.

Beside VOC's figures, ``recall_iou30``: the share of a kind's boxes found by a detection of that kind
overlapping by IoU >= 0.3 (matched one to one, the same way). Labs box cells differently (a white
cell's nucleus, or the whole cell with its pale cytoplasm), and the same lab's labels mix the two:
such a cell is found, and counted, by a box that VOC's 0.5 calls a miss.

VOC's rule (Everingham et al. 2010, the ``VOC2010+`` all-points variant): detections of a
kind are ranked by score over the whole set; each is a true positive when it overlaps a
not-yet-matched true box of that kind in its field by IoU >= 0.5, else a false positive;
AP is the area under the precision-recall curve after precision is made monotone
(each point takes the best precision at any higher recall). As VOC does with its "difficult"
objects, a detection that matches no true box of its kind but overlaps a box of a class
bloodcell does not know (``Boxes.ignored``: smudge cells, blasts...) by IoU >= 0.5 counts
neither way: it is left out of the ranking.
"""

from __future__ import annotations

import numpy as np

from ..data.fields import KINDS, Boxes
from ..inference.detect import Detections, box_iou


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the monotone precision envelope, over all recall points (VOC 2010+)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    changed = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[changed + 1] - r[changed]) * p[changed + 1]))


def match_kind(found: list[Detections], truth: list[Boxes], kind: int, iou: float = 0.5
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores, true-positive flags) of every detection of ``kind``, ranked (those left out on an ignored box
    dropped), and the number of true boxes."""
    entries = []  # (score, field, box)
    for field, det in enumerate(found):
        mine = det.boxes.kinds == kind
        entries += [(s, field, b) for s, b in zip(det.scores[mine], det.boxes.xyxy[mine])]
    entries.sort(key=lambda e: -e[0])
    truth_boxes = [t.xyxy[t.kinds == kind] for t in truth]
    used = [np.zeros(len(t), bool) for t in truth_boxes]
    hits = np.zeros(len(entries), bool)
    kept = np.ones(len(entries), bool)
    for i, (_, field, box) in enumerate(entries):
        candidates = truth_boxes[field]
        if len(candidates):
            overlaps = box_iou(box[None], candidates)[0]
            overlaps[used[field]] = -1
            best = int(np.argmax(overlaps))
            if overlaps[best] >= iou:
                used[field][best] = True
                hits[i] = True
                continue
        ignored = truth[field].ignored
        if len(ignored) and box_iou(box[None], ignored).max() >= iou:
            kept[i] = False
    scores = np.asarray([e[0] for e in entries], np.float32)
    return scores[kept], hits[kept], int(sum(len(t) for t in truth_boxes))


LOOSE_IOU = 0.3  # a cell counted as found whatever the box convention (``recall_iou30``)


def detection_metrics(found: list[Detections], truth: list[Boxes], iou: float = 0.5,
                      operating: float | dict[str, float] = 0.0) -> dict:
    """Per kind: AP50 over every detection given, and recall and precision of those scoring >= ``operating``;
    ``recall_iou30``: the recall of those same detections matched at IoU >= 0.3.

    Give detections from a low threshold (AP needs the whole ranking) and the detector's own
    threshold (one for all kinds, or one per kind name) as ``operating``.
    """
    out = {}
    for kind, name in enumerate(KINDS):
        scores, hits, total = match_kind(found, truth, kind, iou)
        if total == 0:
            out[name] = {"ap50": None, "recall": None, "precision": None, "recall_iou30": None, "boxes": 0,
                         "detections": len(hits)}
            continue
        tp = np.cumsum(hits)
        recall = tp / total
        precision = tp / np.arange(1, len(hits) + 1)
        threshold = operating.get(name, 0.0) if isinstance(operating, dict) else operating
        at = int(np.sum(scores >= threshold))  # ranked: the first `at` detections pass the threshold
        loose_scores, loose_hits, _ = match_kind(found, truth, kind, LOOSE_IOU)
        out[name] = {
            "ap50": voc_ap(recall, precision) if len(hits) else 0.0,
            "recall": float(recall[at - 1]) if at else 0.0,
            "precision": float(precision[at - 1]) if at else 0.0,
            "recall_iou30": float(loose_hits[loose_scores >= threshold].sum() / total),
            "boxes": total,
            "detections": at,
        }
    aps = [v["ap50"] for v in out.values() if v["ap50"] is not None]
    out["map50"] = float(np.mean(aps)) if aps else None
    return out
