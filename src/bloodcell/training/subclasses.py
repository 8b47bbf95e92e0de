"""Subclass targets: train on the cell types file names carry, answer with their classes."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import BloodcellError
from .config import SubclassConfig


@dataclass
class Subclasses:
    names: list[str]  # "class:subclass", or the class's own name for its remainder
    parents: list[int]  # each subclass's class index

    def labels(self, paths: list[str], labels: torch.Tensor, class_names: list[str], config: SubclassConfig) -> torch.Tensor:
        """Each image's subclass index; one of a subclass not trained on counts as its class's remainder."""
        index = {name: i for i, name in enumerate(self.names)}
        out = []
        for path, label in zip(paths, labels.tolist()):
            name = _subclass_name(path, class_names[label], config)
            out.append(index.get(name, index.get(class_names[label], -1)))
            if out[-1] < 0:
                raise BloodcellError(f"{path}: subclass {name!r} was not among the training subclasses of {class_names[label]!r}")
        return torch.tensor(out, dtype=torch.int64)


def _subclass_name(path: str, class_name: str, config: SubclassConfig) -> str:
    match = re.search(config.pattern, Path(path.split("::")[0]).name)
    return f"{class_name}:{match.group(1)}" if match else class_name


def find_subclasses(paths: list[str], labels: list[int], class_names: list[str], config: SubclassConfig) -> Subclasses:
    """The subclasses to train on: those with at least ``min_images`` images, in classes that have two or more.

    A class with fewer than two such subclasses stays one target; a class's images outside
    its kept subclasses form its remainder, named after the class.
    """

    counts = Counter((label, _subclass_name(path, class_names[label], config)) for path, label in zip(paths, labels))
    names, parents = [], []
    for label, class_name in enumerate(class_names):
        kept = sorted(name for (c, name), n in counts.items() if c == label and n >= config.min_images and name != class_name)
        if len(kept) < 2:
            kept = []  # one target for the class
        has_remainder = not kept or any(c == label and name not in kept for c, name in counts)
        for name in kept + ([class_name] if has_remainder else []):
            names.append(name)
            parents.append(label)
    return Subclasses(names, parents)
