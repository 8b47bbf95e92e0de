"""A split decoded once: every image framed and resized to the model's input, kept as uint8 tensors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.errors import BloodcellError
from .preprocess import preprocess
from .sources import Source, load_item


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, S, S) uint8, decoded and resized once
    labels: torch.Tensor  # (N,) int64
    paths: list[str]
    soft: torch.Tensor | None = None  # (N, C) teachers' probabilities, when distilling
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of files left out


def load_split(source: Source, class_names: list[str], image_size: int, workers: int = 2,
               framing: dict | None = None) -> Split:
    """Decode every image once and keep it as uint8 at the model's input size (framed, if the model frames).

    A file that cannot be read is left out and listed in ``unreadable`` with the reason, for the caller to report.
    """
    def load(item):
        try:
            return preprocess(load_item(source, item)[0], image_size, framing)
        except Exception as exc:  # noqa: BLE001 - reported with the file name below
            return exc

    remap = [class_names.index(c) for c in source.class_names]
    images, labels, paths, unreadable = [], [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item, result in zip(source.items, pool.map(load, source.items, chunksize=64)):
            if isinstance(result, Exception):
                unreadable.append((str(item.path), str(result) or type(result).__name__))
                continue
            images.append(torch.from_numpy(np.array(result)).permute(2, 0, 1))
            labels.append(remap[item.label])
            paths.append(item.path)
    if not images:
        raise BloodcellError(f"{source.root}: no readable images"
                             + (f" ({unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""))
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64), paths, unreadable=unreadable)


class TensorImages(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform=None):
        self.split = split
        self.transform = transform

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, index):
        image = self.split.images[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.split.soft is not None:
            return image, self.split.labels[index], self.split.soft[index]
        return image, self.split.labels[index]
