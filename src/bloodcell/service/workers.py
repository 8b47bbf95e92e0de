"""Decoding and preprocessing uploads on worker processes, awaited from the event loop without threads.

Each worker (:func:`bloodcell.data.pipeline.serve_prepare`) holds one end of a socket pair; the
event loop writes a request's bytes to the least busy worker and reads the prepared batch back
from callbacks on the socket (no thread, no task per worker). Compared with a
``ProcessPoolExecutor`` this saves, per request, the pool's feeder and manager threads and
their hand-offs through the GIL, which the service's main process otherwise spends beside HTTP
and the network. A worker that dies fails only the requests it held, and is started again for
the next one.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import socket

from ..core.errors import BloodcellError
from ..data.pipeline import (
    FRAME_HEADER,
    Prepared,
    prepare_entries,
    start_prepare_worker,
)
from ..data.sources import DEFAULT_MAX_PIXELS


class _Worker:
    """One worker process and this side of its socket, read and written by the event loop's callbacks.

    The socket is watched by whichever loop last sent on it (a test client may run each request on
    a new loop); a request still waiting when its loop changes is failed, never left hanging.
    """

    def __init__(self, sock: socket.socket, process=None):
        """``sock``: this side of the worker's socket; ``process``: the worker (None where another end plays it)."""
        self.sock, self.process = sock, process
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.pending: dict[int, asyncio.Future] = {}
        self.inbox, self.outbox = bytearray(), bytearray()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.alive = True

    def _unwatch(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is loop:
            return
        if self.pending or self.outbox or self.inbox:  # a half-read or half-written frame: start afresh
            self.stop("its event loop changed while it held requests")
            return
        self._unwatch()
        self.loop = loop
        loop.add_reader(self.fd, self._on_readable)

    def stop(self, why: str) -> None:
        """Mark it dead, fail what it held, and let the process go."""
        self.alive = False
        self._unwatch()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(BloodcellError(f"a decoding worker stopped ({why}) while preparing these images"))
        self.pending.clear()
        self.sock.close()  # the worker reads the end of its input and exits

    def _on_readable(self) -> None:
        ended = None
        try:
            while True:
                chunk = self.sock.recv(1 << 18)
                if not chunk:
                    ended = "its process ended"
                    break
                self.inbox += chunk
        except BlockingIOError:
            pass
        except OSError as exc:
            ended = str(exc)
        self._answer()  # what arrived before the worker ended still answers its requests
        if ended is not None:
            self.stop(ended)

    def _answer(self) -> None:
        """Resolve the requests whose whole answers are in the inbox."""
        while len(self.inbox) >= FRAME_HEADER.size:
            size = FRAME_HEADER.unpack_from(self.inbox)[0]
            end = FRAME_HEADER.size + size
            if len(self.inbox) < end:
                break
            job, answer = pickle.loads(memoryview(self.inbox)[FRAME_HEADER.size : end])
            del self.inbox[:end]
            future = self.pending.pop(job, None)
            if future is None or future.done():  # its request was cancelled (the client went away)
                continue
            if isinstance(answer, str):
                future.set_exception(BloodcellError(f"preparing the images failed: {answer}"))
            else:
                future.set_result(answer)

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self.outbox)
        except BlockingIOError:
            return
        except OSError as exc:
            self.stop(str(exc))
            return
        del self.outbox[:sent]
        if not self.outbox:
            self.loop.remove_writer(self.fd)

    def send(self, job: int, entries: list) -> asyncio.Future:
        future = self.loop.create_future()
        self.pending[job] = future
        body = pickle.dumps((job, entries), protocol=pickle.HIGHEST_PROTOCOL)
        frame = FRAME_HEADER.pack(len(body)) + body
        if self.outbox:  # earlier frames still queued: keep the order
            self.outbox += frame
            return future
        try:
            sent = self.sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.stop(str(exc))
            return future
        if sent < len(frame):
            self.outbox += frame[sent:]
            self.loop.add_writer(self.fd, self._on_writable)
        return future

    @classmethod
    def start(cls, size: int, framing: dict | None, max_pixels: int) -> _Worker:
        return cls(*start_prepare_worker(size, framing, max_pixels))

    def close(self) -> None:
        if self.alive:
            self.stop("the service is shutting down")
        if self.process is None:
            return
        self.process.join(timeout=1)  # it exits on reading the end of its input
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


class AsyncPreparer:
    """``await preparer(entries)``: a :class:`Prepared` chunk, from ``workers`` processes (0: in the caller).

    Workers start on first use, inside the running event loop.
    """

    def __init__(self, size: int, framing: dict | None = None, workers: int = 1, max_pixels: int | None = None):
        self.size, self.framing, self.workers = size, framing, max(workers, 0)
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self._workers: list[_Worker] = []
        self._jobs = itertools.count()

    def _ready(self, loop: asyncio.AbstractEventLoop) -> list[_Worker]:
        """The workers, watched by ``loop``; dead ones replaced (a start costs a fork from the fork server)."""
        for worker in self._workers:
            worker.attach(loop)
        for index in range(self.workers):
            if index < len(self._workers) and self._workers[index].alive:
                continue
            worker = _Worker.start(self.size, self.framing, self.max_pixels)
            worker.attach(loop)
            if index < len(self._workers):
                self._workers[index].close()
                self._workers[index] = worker
            else:
                self._workers.append(worker)
        return self._workers

    async def start(self) -> None:
        """Start the workers now (the service does at start-up, so its first request does not wait for them)."""
        if self.workers:
            self._ready(asyncio.get_running_loop())

    async def __call__(self, entries: list) -> Prepared:
        if self.workers == 0:
            return prepare_entries(entries, self.size, self.framing, self.max_pixels)
        workers = self._ready(asyncio.get_running_loop())
        worker = min(workers, key=lambda w: len(w.pending))
        return await worker.send(next(self._jobs), entries)

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        self._workers = []
