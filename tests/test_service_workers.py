"""The service's decoding workers (awaited from the event loop) and the batcher's asyncio path."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys

import numpy as np
import pytest
from PIL import Image

from bloodcell.core.errors import BloodcellError
from bloodcell.data.pipeline import prepare_entries
from bloodcell.service.batcher import DynamicBatcher
from bloodcell.service.workers import AsyncPreparer

FRAMING = {"window": 0.65, "margin": 1.5, "min_contrast": 15.0}


def jpeg(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 225, np.uint8)
    y, x = np.mgrid[:size, :size]
    centre = rng.integers(30, size - 30, 2)
    image[(y - centre[0]) ** 2 + (x - centre[1]) ** 2 < rng.integers(100, 400)] = (120, 60, 150)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_workers_prepare_exactly_what_the_caller_would_and_survive_a_dead_worker():
    # The last request is larger than a socket's buffer both ways: written and read in parts.
    requests = [[jpeg(0)], [jpeg(1), b"not an image", jpeg(2)], [b"\x89PNG broken"], [jpeg(3)] * 5,
                [jpeg(seed, 160) for seed in range(300)]]

    async def scenario():
        preparer = AsyncPreparer(32, FRAMING, workers=2)
        try:
            answers = await asyncio.gather(*(preparer(entries) for entries in requests * 2))
            # A worker killed mid-service fails only what it held; the next request starts a new one.
            victim = preparer._workers[0]
            os.kill(victim.process.pid, signal.SIGKILL)
            victim.process.join(timeout=10)
            for _ in range(200):
                if not victim.alive:
                    break
                await asyncio.sleep(0.01)
            assert not victim.alive
            after = await asyncio.gather(*(preparer(entries) for entries in requests))
            assert all(worker.alive for worker in preparer._workers) and victim not in preparer._workers
            return answers, after
        finally:
            preparer.close()

    answers, after = asyncio.run(scenario())
    for entries, prepared in zip(requests * 2 + requests, answers + after):
        here = prepare_entries(entries, 32, FRAMING)
        assert prepared.kept == here.kept and prepared.failed == here.failed
        assert prepared.batch.shape == here.batch.shape and np.array_equal(prepared.batch, here.batch)
    assert answers[1].kept == [0, 2] and answers[1].failed[0][0] == 1 and answers[2].kept == []


def test_a_worker_that_dies_fails_the_requests_it_held_with_a_clear_error():
    async def scenario():
        preparer = AsyncPreparer(32, FRAMING, workers=1)
        try:
            await preparer([jpeg(0)])
            worker = preparer._workers[0]
            pending = asyncio.ensure_future(preparer([jpeg(seed) for seed in range(200)]))
            await asyncio.sleep(0.05)
            os.kill(worker.process.pid, signal.SIGKILL)
            with pytest.raises(BloodcellError, match="worker stopped"):
                await asyncio.wait_for(pending, 30)
            return await preparer([jpeg(5)])
        finally:
            preparer.close()

    assert asyncio.run(scenario()).kept == [0]


def test_no_workers_prepares_in_the_caller():
    prepared = asyncio.run(AsyncPreparer(32, FRAMING, workers=0)([jpeg(4)]))
    assert np.array_equal(prepared.batch, prepare_entries([jpeg(4)], 32, FRAMING).batch)


def test_the_batcher_answers_awaiting_requests_with_their_own_rows_in_shared_calls():
    calls = []

    def score(batch):
        calls.append(len(batch))
        return batch.reshape(len(batch), -1)[:, :3].astype(np.float32), batch[:, 0, 0, 0].astype(np.float32)

    batcher = DynamicBatcher(score, max_batch=8, window_s=0.05)
    requests = [np.full((1 + n % 3, 3, 2, 2), n, dtype=np.uint8) for n in range(10)]

    async def scenario():
        for _ in requests:
            batcher.expect()
        return await asyncio.gather(*(batcher(batch) for batch in requests))

    for batch, (probs, ood) in zip(requests, asyncio.run(scenario())):
        assert len(probs) == len(batch) and np.all(probs == batch[0, 0, 0, 0]) and np.all(ood == batch[0, 0, 0, 0])
    assert sum(calls) == sum(len(b) for b in requests) and max(calls) <= 8 and len(calls) < len(requests)

    broken = DynamicBatcher(lambda batch: 1 / 0)

    async def failing():
        return await broken(requests[0], expected=False)

    with pytest.raises(ZeroDivisionError):
        asyncio.run(failing())



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are Linux's")
def test_the_network_thread_yields_to_the_decoding_workers():
    batcher = DynamicBatcher(lambda batch: (batch.reshape(len(batch), -1)[:, :3].astype(np.float32), None), niceness=5)
    batcher.submit(np.zeros((1, 3, 2, 2), np.uint8), expected=False).result(timeout=10)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, batcher.thread_id) == min(own + 5, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == own  # the process and its other threads keep theirs


def test_an_answer_sent_just_before_a_worker_ends_still_reaches_its_request():
    import pickle
    import socket

    from bloodcell.data.pipeline import FRAME_HEADER, Prepared
    from bloodcell.service.workers import _Worker

    async def scenario():
        ours, theirs = socket.socketpair()
        worker = _Worker(ours)  # no process: the far end of the socket is played here
        worker.attach(asyncio.get_running_loop())
        answered, lost = worker.send(1, [b"x"]), worker.send(2, [b"y"])
        reply = pickle.dumps((1, Prepared(np.zeros((1, 3, 4, 4), np.uint8), [0], [])))
        theirs.sendall(FRAME_HEADER.pack(len(reply)) + reply)
        theirs.close()  # the answer and the end arrive together
        prepared = await asyncio.wait_for(answered, 10)
        with pytest.raises(BloodcellError, match="worker stopped"):
            await asyncio.wait_for(lost, 10)
        return prepared, worker.alive

    prepared, alive = asyncio.run(scenario())
    assert prepared.kept == [0] and prepared.batch.shape == (1, 3, 4, 4) and not alive
