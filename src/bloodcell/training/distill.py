"""Knowledge distillation: trained models' probabilities as soft training targets.

Hinton et al.'s recipe, offline: the teachers (one model, or several whose calibrated
probabilities are averaged) score every training image once, before training, and the
student learns from a mix of the true label and the teachers' distribution over the
classes. Scoring once keeps the student's training exactly as fast as without a teacher,
which a 2-core CPU needs: running ten teachers beside every training step would cost ten
forward passes per step. The price is that the targets describe the whole framed image,
not each augmented view of it.

The targets file is safetensors (no pickle): a ``probabilities`` tensor (N x C) and, in its
metadata, the class names, the teachers and each row's image key: the image's path inside
its split folder (``neutrophil/SNE_1234.jpg``), or its array entry for ``.npz`` data. So a
file made from one `bloodcell curate` output fits any other output of the same curation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from ..core.errors import BloodcellError
from ..inference.teachers import load_targets
from ..models import merge_subclasses, subclass_merge_mask


class DistillConfig(BaseModel):
    """Learn from teachers' soft targets as well as from the labels (``bloodcell distill-targets`` makes the file)."""

    targets: Path = Field(description="safetensors file of the teachers' probabilities on the training images")
    weight: float = Field(0.5, ge=0, le=1, description="share of the distillation term in the loss; the label's term gets the rest")
    temperature: float = Field(2.0, gt=0, description="softens teacher and student alike; the term is scaled by its square (Hinton et al.)")


def targets_for(path: str | Path, keys: list[str], class_names: list[str],
                loaded: tuple[dict[str, np.ndarray], list[str], dict] | None = None) -> torch.Tensor:
    """The targets of ``keys``, in order, columns in ``class_names`` order; every key must be there.
    ``loaded``: what :func:`load_targets` already read from ``path``."""
    table, names, _ = loaded or load_targets(path)
    if sorted(names) != sorted(class_names):
        raise BloodcellError(f"{path}: teachers' classes {names} differ from the training classes {class_names}")
    missing = [k for k in keys if k not in table]
    if missing:
        raise BloodcellError(f"{path}: no teacher targets for {len(missing)} of {len(keys)} training images "
                             f"(first: {missing[0]}); make them from the same curated data")
    columns = [names.index(c) for c in class_names]
    return torch.from_numpy(np.stack([table[k][columns] for k in keys]))


class DistillationLoss(nn.Module):
    """``(1 - weight) * hard(logits, labels) + weight * T^2 * KL(teacher_T || student_T)``.

    With subclass outputs (``parents``: each output's class) the student's class
    distribution is the sum of its subclasses' probabilities, as the exported model answers.
    """

    def __init__(self, hard: nn.Module, weight: float, temperature: float, parents: torch.Tensor | None = None):
        super().__init__()
        self.hard, self.weight, self.temperature = hard, weight, temperature
        # The network's own merge of subclasses into classes, built once.
        self.mask = subclass_merge_mask(parents.cpu()).to(parents.device) if parents is not None else None

    def class_log_probabilities(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        log_p = torch.log_softmax(logits / temperature, 1)
        return log_p if self.mask is None else merge_subclasses(log_p, self.mask)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        teacher_log = torch.log_softmax(torch.log(teacher.clamp_min(1e-8)) / t, 1)
        student_log = self.class_log_probabilities(logits, t)
        soft = (teacher_log.exp() * (teacher_log - student_log)).sum(1).mean() * t * t
        return (1 - self.weight) * self.hard(logits, labels) + self.weight * soft
