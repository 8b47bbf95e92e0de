"""Decoding and preprocessing off the critical path: worker processes, in order, a bounded lookahead.

A network on a CPU runs faster than Python can decode and frame images for it, and threads
doing that work mostly wait on each other for the GIL. :class:`Preparer` runs
:func:`prepare_entries` (decode, then the one :func:`bloodcell.data.preprocess_batch`) on a
pool of worker processes, a chunk at a time, while the caller runs the network on the chunks
already done. What comes back is exactly what the same function gives in-process (tested):
the workers run the same code on the same bytes.

Workers start from a fork server that has imported only this layer (NumPy, SciPy, Pillow:
never PyTorch or ONNX Runtime), about half a second once per :class:`Preparer`; below a few
chunks of work, or with ``workers=0``, everything runs in the calling process instead. Unlike
multiprocessing's default, the workers never import the caller's ``__main__`` (they need
nothing from it), so a script without an ``if __name__ == "__main__":`` guard is safe.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext, ForkServerProcess
from pathlib import Path

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


_MAIN_LOCK = threading.Lock()
# What the fork server imports once, so that every worker starts with it.
PRELOAD = [__name__, "scipy.ndimage"]


@contextmanager
def _main_module_hidden():
    """While a worker is launched, multiprocessing sees no file or spec to re-import as ``__main__``."""
    main = sys.modules["__main__"]
    with _MAIN_LOCK:
        saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
        try:
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


class _LibraryOnlyProcess(ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        with _main_module_hidden():
            return ForkServerProcess._Popen(process_obj)


class _LibraryOnlyContext(ForkServerContext):
    Process = _LibraryOnlyProcess


def _context() -> _LibraryOnlyContext:
    context = _LibraryOnlyContext()
    context.set_forkserver_preload(PRELOAD)
    return context


def warm_up() -> None:
    """Start the fork server now (it imports this layer in the background, ~0.5 s), so workers start at once later."""
    _context()
    with _main_module_hidden():
        forkserver.ensure_running()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def prepare_entries(entries: list[Entry], size: int, framing: dict | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """Decode and preprocess a chunk; unreadable entries are listed in ``failed``, never raised."""
    images, kept, failed = [], [], []
    for position, entry in enumerate(entries):
        if isinstance(entry, np.ndarray):
            images.append(entry)
            kept.append(position)
            continue
        try:
            image, _ = decode_pil(entry, max_pixels)
        except ImageReadError as exc:
            failed.append((position, str(exc)))
            continue
        images.append(image)
        kept.append(position)
    batch = preprocess_batch(images, size, framing)
    return Prepared(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)), kept, failed)


def prepare_into(entries: list[Entry], size: int, framing: dict | None, max_pixels: int, slot: str) -> Prepared:
    """:func:`prepare_entries` on a worker, its batch written to the shared file ``slot`` rather than sent back.

    Sending 64 images of 128 px through a pipe costs a pickling and two copies of 3 MB; a
    file in shared memory (/dev/shm), mapped by both processes, costs one copy.
    """
    prepared = prepare_entries(entries, size, framing, max_pixels)
    if len(prepared.batch):
        shared = np.memmap(slot, dtype=np.uint8, mode="r+", shape=prepared.batch.shape)
        shared[...] = prepared.batch
        del shared
    prepared.batch = prepared.batch[:0]  # what travels back: the shape, no pixels
    return prepared


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

    def __enter__(self) -> Preparer:  # noqa: PYI034 - Self needs Python 3.11
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
            self._pool = ProcessPoolExecutor(self.workers, mp_context=_context())
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
        With workers, each batch is a view of a shared-memory slot that is written again a few
        chunks later: use it (or copy it) before asking for the one after next.
        """
        if self.workers == 0:
            yield from (self(chunk) for chunk in chunks)
            return
        ahead = ahead or 2 * self.workers
        with tempfile.TemporaryDirectory(prefix="bloodcell-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
            # Batches come back through ahead + 2 shared files used in turn: one being read by
            # the caller, ``ahead`` being written, and the next one, free.
            slots: list[tuple[str, int, np.memmap]] = []
            pending: deque[tuple[Future, int | None]] = deque()

            def slot_for(turn: int, chunk: list[Entry]) -> int | None:
                """The slot of the ``turn``-th chunk (None: too big for it, it travels through the pipe)."""
                index = turn % (ahead + 2)
                if index == len(slots):
                    path = os.path.join(tmp, f"slot{index}")
                    capacity = max(len(chunk), 1)
                    slots.append((path, capacity, np.memmap(path, np.uint8, "w+", shape=(capacity, 3, self.size, self.size))))
                return index if len(chunk) <= slots[index][1] else None

            def receive(future: Future, index: int | None) -> Prepared:
                prepared = future.result()
                if index is not None:
                    prepared.batch = slots[index][2][: len(prepared.kept)]
                return prepared

            for turn, chunk in enumerate(chunks):
                index = slot_for(turn, chunk)
                if index is None:
                    future = self.submit(chunk)
                else:
                    future = self.pool.submit(prepare_into, chunk, self.size, self.framing, self.max_pixels, slots[index][0])
                pending.append((future, index))
                if len(pending) > ahead:
                    yield receive(*pending.popleft())
            while pending:
                yield receive(*pending.popleft())


# Framing of the messages between the service and its preparing workers: an 8-byte length, then a pickle.
FRAME_HEADER = struct.Struct("!Q")


def _recv_exactly(sock: socket.socket, size: int) -> bytearray | None:
    """``size`` bytes from ``sock``, or None when the other side closed it."""
    buffer = bytearray(size)
    got = 0
    with memoryview(buffer) as view:
        while got < size:
            count = sock.recv_into(view[got:])
            if count == 0:
                return None
            got += count
    return buffer


def serve_prepare(sock: socket.socket, size: int, framing: dict | None, max_pixels: int) -> None:
    """A worker's loop: read ``(job, entries)`` frames from ``sock`` and answer ``(job, Prepared or error)``.

    Ends when the other side closes the socket. Unreadable images are in the answer's ``failed``;
    anything else that goes wrong is sent back as its message, for that job only.
    """
    with sock:
        while True:
            header = _recv_exactly(sock, FRAME_HEADER.size)
            if header is None:
                return
            body = _recv_exactly(sock, FRAME_HEADER.unpack(header)[0])
            if body is None:
                return
            job, entries = pickle.loads(body)
            try:
                answer: Prepared | str = prepare_entries(entries, size, framing, max_pixels)
            except Exception as exc:  # noqa: BLE001 - reported to the one request it concerns
                answer = f"{type(exc).__name__}: {exc}"
            reply = pickle.dumps((job, answer), protocol=pickle.HIGHEST_PROTOCOL)
            sock.sendall(FRAME_HEADER.pack(len(reply)) + reply)


def start_prepare_worker(size: int, framing: dict | None, max_pixels: int) -> tuple[socket.socket, ForkServerProcess]:
    """A process running :func:`serve_prepare`, and this side's end of its socket."""
    ours, theirs = socket.socketpair()
    process = _context().Process(target=serve_prepare, args=(theirs, size, framing, max_pixels), daemon=True)
    process.start()
    theirs.close()
    return ours, process
