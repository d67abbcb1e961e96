"""The dynamic batcher on its own: coalescing, limits, isolation of failures and cancelled items."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from altclip_fast.apps.serve.batching import Batcher, BatchFailed, QueueFull


class Recorder:
    """A fake model: a row is ``(kind, payload)``; records every batch; can block or fail on demand."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[tuple[str, list]] = []
        self.delay = delay
        self.fail_on = None
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, kind, payloads):
        self.gate.wait(5)
        time.sleep(self.delay)
        self.batches.append((kind, list(payloads)))
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError("boom")
        return [(kind, p) for p in payloads]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def _with_batcher(recorder, body, **limits):
    options = dict(max_batch_tokens=10, max_batch_images=3, max_wait_ms=30, max_queue=50) | limits
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(recorder, pool, **options)
        await batcher.start()
        try:
            return await body(batcher)
        finally:
            await batcher.stop()


def test_concurrent_requests_coalesce_and_each_gets_its_own_rows():
    recorder = Recorder()

    async def body(batcher):
        async def request(i):
            await asyncio.sleep(0.001 * (i % 3))
            payloads = [f"r{i}-{j}" for j in range(1 + i % 3)]
            return payloads, await asyncio.gather(*batcher.submit("text", payloads, [2] * len(payloads)))

        return await asyncio.gather(*(request(i) for i in range(12)))

    results = run(_with_batcher(recorder, body))
    for payloads, rows in results:
        assert rows == [("text", p) for p in payloads]
    sizes = [len(p) for _, p in recorder.batches]
    assert sum(sizes) == sum(len(p) for p, _ in results)
    assert len(recorder.batches) < len(results)  # coalesced
    assert all(2 * n <= 10 for n in sizes)  # the token budget


def test_image_batches_respect_max_images_and_kinds_do_not_mix():
    recorder = Recorder()

    async def body(batcher):
        images = batcher.submit("image", list(range(7)), [1] * 7)
        texts = batcher.submit("text", ["a", "b"], [3, 3])
        return await asyncio.gather(*images), await asyncio.gather(*texts)

    images, texts = run(_with_batcher(recorder, body))
    assert images == [("image", i) for i in range(7)] and texts == [("text", "a"), ("text", "b")]
    for kind, payloads in recorder.batches:
        assert len(payloads) <= 3 if kind == "image" else all(isinstance(p, str) for p in payloads)


def test_a_text_longer_than_the_budget_runs_alone():
    recorder = Recorder()

    async def body(batcher):
        return await asyncio.gather(*batcher.submit("text", ["long", "x"], [25, 1]))

    assert run(_with_batcher(recorder, body)) == [("text", "long"), ("text", "x")]
    assert recorder.batches[0] == ("text", ["long"])


def test_a_lone_item_waits_at_most_max_wait():
    recorder = Recorder()

    async def body(batcher):
        start = time.monotonic()
        await asyncio.gather(*batcher.submit("image", [1], [1]))
        return time.monotonic() - start

    assert run(_with_batcher(recorder, body, max_wait_ms=50)) < 1.0


def test_queue_full_refuses_the_whole_request():
    recorder = Recorder()
    recorder.gate.clear()  # hold the first batch so the queue fills

    async def body(batcher):
        first = batcher.submit("image", [0], [1])
        await asyncio.sleep(0.1)  # taken into a (held) batch
        queued = batcher.submit("image", [1, 2, 3], [1, 1, 1])
        with pytest.raises(QueueFull):
            batcher.submit("image", [4, 5], [1, 1])
        assert batcher.depth == 3  # nothing of the refused request was queued
        recorder.gate.set()
        return await asyncio.gather(*first, *queued)

    assert run(_with_batcher(recorder, body, max_queue=4)) == [("image", i) for i in range(4)]


def test_cancelled_items_are_dropped_from_the_batch():
    recorder = Recorder()
    recorder.gate.clear()

    async def body(batcher):
        first = batcher.submit("text", ["hold"], [1])
        await asyncio.sleep(0.1)
        gone = batcher.submit("text", ["gone1", "gone2"], [1, 1])
        kept = batcher.submit("text", ["kept"], [1])
        for future in gone:
            future.cancel()
        recorder.gate.set()
        return await asyncio.gather(*first, *kept)

    assert run(_with_batcher(recorder, body)) == [("text", "hold"), ("text", "kept")]
    seen = [p for _, batch in recorder.batches for p in batch]
    assert "gone1" not in seen and "gone2" not in seen


def test_a_failing_batch_fails_only_its_requests():
    recorder = Recorder()
    recorder.fail_on = "bad"

    async def body(batcher):
        bad = batcher.submit("text", ["bad"], [10])  # a full batch on its own
        good = batcher.submit("text", ["good"], [10])
        results = await asyncio.gather(*bad, *good, return_exceptions=True)
        return results

    bad, good = run(_with_batcher(recorder, body))
    assert isinstance(bad, BatchFailed) and "boom" in str(bad)
    assert good == ("text", "good")


def test_limits_are_checked():
    with pytest.raises(ValueError):
        Batcher(Recorder(), None, max_batch_tokens=0, max_batch_images=1, max_wait_ms=1, max_queue=1)


def test_everything_queued_while_a_batch_runs_goes_into_the_next_one():
    """32 concurrent one-text requests behind a running batch form one batch, not several: what the server
    needs at 32 clients (bench/RESULTS.md, "Where the server's text throughput goes")."""
    recorder = Recorder()
    recorder.gate.clear()  # the first batch holds the model until all the others are queued

    async def body(batcher):
        first = batcher.submit("text", ["first"], [8])
        while not recorder.batches and batcher.depth:  # bounded by run()'s 20 s
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # the first batch is in the model thread, waiting at the gate
        rest = [batcher.submit("text", [f"r{i}"], [8]) for i in range(31)]
        assert batcher.depth == 31
        recorder.gate.set()
        return await asyncio.gather(*first, *(f for futures in rest for f in futures))

    rows = run(_with_batcher(recorder, body, max_batch_tokens=8192, max_wait_ms=5, max_queue=64))
    assert [len(p) for _, p in recorder.batches] == [1, 31]
    assert rows == [("text", "first")] + [("text", f"r{i}") for i in range(31)]


def test_closed_loop_clients_keep_batches_large():
    """32 clients that each send again as soon as answered (staggered at first, as real ones are): after the
    first round every batch takes all that is queued. The clients split into cohorts that alternate (one
    is answered while the other's batch runs; here 12 and 20), as in the real server, so batches average
    at least a quarter of the clients, and none is a lone item once the load is on."""
    recorder = Recorder(delay=0.03)

    async def body(batcher):
        async def client(c):
            await asyncio.sleep(0.003 * c)  # arrivals spread over ~0.1 s, longer than max_wait
            for k in range(4):
                await asyncio.gather(*batcher.submit("text", [f"c{c}-{k}"], [8]))

        await asyncio.gather(*(client(c) for c in range(32)))

    run(_with_batcher(recorder, body, max_batch_tokens=8192, max_wait_ms=5, max_queue=64))
    sizes = [len(p) for _, p in recorder.batches]
    assert sum(sizes) == 128
    assert sum(sizes) / len(sizes) >= 32 / 4, sizes
    assert min(sizes[len(sizes) // 2:]) > 1, sizes
