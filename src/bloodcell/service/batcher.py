"""Dynamic batching: concurrent requests' images go through the network as one batch.

One thread owns the network. A request hands it a prepared batch and awaits the answer;
the thread takes everything queued (the requests that arrived while it ran the last batch),
optionally waits up to a small window for requests known to be on their way (accepted, still
being decoded), then runs the network once on all of it and hands each request its rows. With
one client nothing waits: a request that arrives alone is run at once.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

Scores = tuple[np.ndarray, np.ndarray | None]  # (probabilities, out-of-distribution scores or None)


class DynamicBatcher:
    """Run ``score`` (uint8 (N, 3, S, S) -> :data:`Scores`) over requests gathered into batches.

    ``window_s``: how long a batch may wait for requests already on their way; ``max_batch``:
    the most images in one network call (a request larger than that runs alone). ``niceness``:
    how much lower than the server's the network thread's scheduling priority is (Linux), so
    that on a busy machine the decoding workers, the slowest stage, are not held up by it; the
    network then runs in their gaps, on larger batches (measured on 2 cores at 8 clients:
    +8% requests/s, p99 −20%; docs/experiments.md).
    """

    def __init__(self, score: Callable[[np.ndarray], Scores], max_batch: int = 64, window_s: float = 0.0,
                 niceness: int = 0):
        self.score, self.max_batch, self.window_s, self.niceness = score, max_batch, window_s, niceness
        self.thread_id: int | None = None  # the network thread's native id, once it runs
        self.queue: queue.Queue[tuple[np.ndarray, Future | asyncio.Future]] = queue.Queue()
        self._incoming = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._held: tuple[np.ndarray, Future] | None = None  # did not fit the last batch: starts the next
        self.batches = 0  # network calls made, and the images they held (for tests and /v1/model)
        self.images = 0

    def expect(self) -> None:
        """A request was accepted and will call :meth:`submit` (or :meth:`withdraw`) soon."""
        with self._lock:
            self._incoming += 1

    def withdraw(self) -> None:
        """An expected request will not come (nothing in it was readable)."""
        with self._lock:
            self._incoming -= 1

    def submit(self, batch: np.ndarray, expected: bool = True,
               future: Future | asyncio.Future | None = None) -> Future | asyncio.Future:
        """Queue a prepared batch; a Future of its :data:`Scores` (``future``: an asyncio one to resolve instead)."""
        future = Future() if future is None else future
        if expected:
            self.withdraw()
        self.queue.put((batch, future))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="bloodcell-batcher", daemon=True)
                self._thread.start()
        return future

    async def __call__(self, batch: np.ndarray, expected: bool = True) -> Scores:
        # An asyncio future, resolved on its loop once per network call for all the requests it
        # held (one wake-up of the loop per batch, rather than one per request).
        return await self.submit(batch, expected, asyncio.get_running_loop().create_future())

    def _gather(self) -> list[tuple[np.ndarray, Future]]:
        items = [self._held or self.queue.get()]
        self._held = None
        total = len(items[0][0])
        deadline = time.monotonic() + self.window_s
        while total < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if self._incoming <= 0 or remaining <= 0:
                    break
                try:
                    item = self.queue.get(timeout=min(remaining, 0.0005))
                except queue.Empty:
                    continue
            if total + len(item[0]) > self.max_batch:
                self._held = item
                break
            items.append(item)
            total += len(item[0])
        return items

    def _run(self) -> None:
        self.thread_id = threading.get_native_id()
        if self.niceness and sys.platform.startswith("linux"):
            try:  # on Linux, a thread's own priority (raising niceness needs no privilege)
                os.setpriority(os.PRIO_PROCESS, self.thread_id, os.getpriority(os.PRIO_PROCESS, self.thread_id) + self.niceness)
            except OSError:
                pass
        while True:
            items = self._gather()
            try:
                probs, ood = self.score(np.concatenate([batch for batch, _ in items]))
            except Exception as exc:  # noqa: BLE001 - handed to every request of the batch
                _deliver([(future, exc, False) for _, future in items])
                continue
            self.batches += 1
            self.images += len(probs)
            answers, start = [], 0
            for batch, future in items:
                end = start + len(batch)
                answers.append((future, (probs[start:end], None if ood is None else ood[start:end]), True))
                start = end
            _deliver(answers)


def _deliver(answers: list[tuple[Future | asyncio.Future, object, bool]]) -> None:
    """Resolve each future with (value, True) or (exception, False): asyncio ones by one call on each loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for future, value, ok in answers:
        if isinstance(future, asyncio.Future):
            by_loop.setdefault(future.get_loop(), []).append((future, value, ok))
        elif ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, group)
        except RuntimeError:  # the loop has closed: nobody awaits these any more
            pass


def _resolve(group: list) -> None:
    for future, value, ok in group:
        if not future.done():  # a request cancelled while it waited (its client went away)
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
