"""Decoding and preprocessing off the critical path: worker processes, in order, a bounded lookahead.

A network on a CPU runs faster than Python can decode and frame images for it, and threads
doing that work mostly wait on each other for the GIL. :class:`Preparer` runs
:func:`prepare_entries` (decode, then the one :func:`bloodcell.data.preprocess_batch`) on a
pool of worker processes, a chunk at a time, while the caller runs the network on the chunks
already done. What comes back is exactly what the same function gives in-process (tested):
the workers run the same code on the same bytes.

Workers start from a fork server that has imported only this layer (NumPy, SciPy, Pillow:
never PyTorch or ONNX Runtime), about half a second once per :class:`Preparer`; below a few
chunks of work, or with ``workers=0``, everything runs in the calling process instead.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np

from ..core.errors import ImageReadError
from .preprocess import preprocess_batch
from .sources import DEFAULT_MAX_PIXELS, decode_pil

# A file to decode, the bytes of one (an upload), or an image already decoded to RGB uint8.
Entry = str | Path | bytes | np.ndarray


@dataclass
class Prepared:
    """One chunk, ready for the network."""

    batch: np.ndarray  # uint8 (n, 3, S, S), C-contiguous: the chunk's readable images, in order
    kept: list[int]  # position in the chunk of each image of ``batch``
    failed: list[tuple[int, str]] = field(default_factory=list)  # (position in the chunk, why it was refused)
    conversions: Counter = field(default_factory=Counter)  # what decoding had to convert ("mode P converted to RGB")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def prepare_entries(entries: list[Entry], size: int, framing: dict | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """Decode and preprocess a chunk; unreadable entries are listed in ``failed``, never raised."""
    images, kept, failed, conversions = [], [], [], Counter()
    for position, entry in enumerate(entries):
        if isinstance(entry, np.ndarray):
            images.append(entry)
            kept.append(position)
            continue
        try:
            image, note = decode_pil(entry, max_pixels)
        except ImageReadError as exc:
            failed.append((position, str(exc)))
            continue
        images.append(image)
        kept.append(position)
        if note:
            conversions[note] += 1
    batch = preprocess_batch(images, size, framing)
    return Prepared(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)), kept, failed, conversions)


class Preparer:
    """Runs :func:`prepare_entries` for one model's input contract, on worker processes when asked.

    ``workers``: processes (None: one per usable core; 0: in the calling process). Use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, size: int, framing: dict | None = None, workers: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.size, self.framing, self.max_pixels = size, framing, max_pixels
        self.workers = usable_cores() if workers is None else max(workers, 0)
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    @property
    def pool(self) -> ProcessPoolExecutor | None:
        """The worker processes, started on first use (None when ``workers`` is 0)."""
        if self._pool is None and self.workers > 0:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
        return self._pool

    def __call__(self, entries: list[Entry]) -> Prepared:
        """One chunk, in this process."""
        return prepare_entries(entries, self.size, self.framing, self.max_pixels)

    def submit(self, entries: list[Entry]) -> Future:
        """One chunk on a worker process (or done at once here when there are none): a Future of :class:`Prepared`."""
        if self.pool is None:
            future: Future = Future()
            future.set_result(self(entries))
            return future
        return self.pool.submit(prepare_entries, entries, self.size, self.framing, self.max_pixels)

    def map(self, chunks: Iterable[list[Entry]], ahead: int | None = None) -> Iterator[Prepared]:
        """Each chunk prepared, in order, with up to ``ahead`` (default: two per worker) in flight.

        While the caller works on one chunk (runs the network), the workers prepare the next.
        """
        if self.workers == 0:
            yield from (self(chunk) for chunk in chunks)
            return
        ahead = ahead or 2 * self.workers
        pending: deque[Future] = deque()
        for chunk in chunks:
            pending.append(self.submit(chunk))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
