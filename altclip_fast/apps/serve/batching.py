"""Dynamic batching for ``altclip-fast serve``: concurrent requests' items coalesced into model batches.

Pure asyncio (no web framework), so it is tested on its own. Requests ``submit`` already prepared
items (token ids, or decoded ``uint8`` crops) and get one future per item. One worker task forms
batches, one kind at a time (texts or images, whichever has waited longest):

- texts up to ``max_batch_tokens`` real tokens (the model packs them, so padding costs nothing),
- images up to ``max_batch_images``,
- waiting at most ``max_wait_ms`` after the oldest queued item arrived for a batch to fill.

The forward pass runs in ``executor`` (one thread owns the model), so the event loop keeps accepting
and preparing requests while a batch runs, and the next batch fills meanwhile. The queue is bounded
by ``max_queue`` items: ``submit`` refuses a request that does not fit as a whole (``QueueFull``), so
memory stays bounded under any load. Items whose future was cancelled (the client went away) are
dropped when the batch is formed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Batcher", "QueueFull", "BatchFailed", "NullMetrics"]

KINDS = ("text", "image")


class QueueFull(Exception):
    """The queue cannot take the request's items now; ``retry_after`` seconds is a fair wait."""

    def __init__(self, queued: int, asked: int, limit: int, retry_after: int = 1):
        super().__init__(f"the queue holds {queued} of at most {limit} items; this request adds {asked}")
        self.retry_after = retry_after


class BatchFailed(Exception):
    """The model raised on a batch: every request in it gets this."""


class NullMetrics:
    """The metrics hooks the batcher calls; the server passes a Prometheus-backed one."""

    def queue_depth(self, kind: str, depth: int) -> None: ...
    def batch(self, kind: str, items: int, tokens: int, waits: Sequence[float], seconds: float) -> None: ...
    def failure(self, reason: str, count: int = 1) -> None: ...


@dataclass
class _Item:
    payload: Any
    cost: int  # real tokens (text) or 1 (image)
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[str, list], Sequence],
        executor,
        *,
        max_batch_tokens: int,
        max_batch_images: int,
        max_wait_ms: float,
        max_queue: int,
        metrics=None,
    ):
        if min(max_batch_tokens, max_batch_images, max_queue) < 1 or max_wait_ms < 0:
            raise ValueError("batch and queue limits must be at least 1, max_wait_ms at least 0")
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_images = max_batch_images
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics or NullMetrics()
        self._queues: dict[str, deque[_Item]] = {kind: deque() for kind in KINDS}
        self._queued_cost = {kind: 0 for kind in KINDS}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="altclip-batcher")

    async def stop(self) -> None:
        """Stop the worker; anything still queued fails (the server drains requests before this)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for kind, queue in self._queues.items():
            while queue:
                item = queue.popleft()
                if not item.future.done():
                    item.future.set_exception(BatchFailed("the server is shutting down"))
            self._queued_cost[kind] = 0
            self.metrics.queue_depth(kind, 0)

    # ------------------------------------------------------------------ requests

    @property
    def depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def submit(self, kind: str, payloads: Sequence, costs: Sequence[int]) -> list[asyncio.Future]:
        """Queue a request's items, all or none. Raises ``QueueFull`` when they do not fit."""
        if kind not in self._queues:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if self._task is None:
            raise RuntimeError("the batcher is not running")
        depth = self.depth
        if depth + len(payloads) > self.max_queue:
            raise QueueFull(depth, len(payloads), self.max_queue)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = []
        for payload, cost in zip(payloads, costs, strict=True):
            item = _Item(payload, int(cost), loop.create_future(), now)
            self._queues[kind].append(item)
            self._queued_cost[kind] += item.cost
            futures.append(item.future)
        self.metrics.queue_depth(kind, len(self._queues[kind]))
        self._wake.set()
        return futures

    # ------------------------------------------------------------------ the worker

    def _full(self, kind: str) -> bool:
        if kind == "text":
            return self._queued_cost[kind] >= self.max_batch_tokens
        return len(self._queues[kind]) >= self.max_batch_images

    def _oldest_kind(self) -> str | None:
        heads = [(q[0].enqueued, kind) for kind, q in self._queues.items() if q]
        return min(heads)[1] if heads else None

    def _take(self, kind: str) -> list[_Item]:
        queue, batch, used = self._queues[kind], [], 0
        dropped = 0
        while queue:
            item = queue[0]
            if item.future.done():  # cancelled: its client has gone
                queue.popleft()
                self._queued_cost[kind] -= item.cost
                dropped += 1
                continue
            limit = self.max_batch_tokens if kind == "text" else self.max_batch_images
            if batch and used + item.cost > limit:
                break
            queue.popleft()
            self._queued_cost[kind] -= item.cost
            batch.append(item)
            used += item.cost
        if dropped:
            self.metrics.failure("client_disconnected", dropped)
        self.metrics.queue_depth(kind, len(queue))
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            kind = self._oldest_kind()
            if kind is None:
                await self._wake.wait()
                continue
            # Let the batch fill until it is full or its oldest item has waited max_wait.
            deadline = self._queues[kind][0].enqueued + self.max_wait
            while not self._full(kind):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take(kind)
            if not batch:
                continue
            start = time.monotonic()
            waits = [start - item.enqueued for item in batch]
            try:
                rows = await loop.run_in_executor(self._executor, self._run_batch, kind, [i.payload for i in batch])
                if len(rows) != len(batch):
                    raise BatchFailed(f"the model returned {len(rows)} rows for {len(batch)} items")
            except Exception as exc:  # one failed batch fails its requests, never the worker
                self.metrics.failure("inference", len(batch))
                error = exc if isinstance(exc, BatchFailed) else BatchFailed(f"{type(exc).__name__}: {exc}")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self.metrics.batch(kind, len(batch), sum(i.cost for i in batch) if kind == "text" else 0,
                               waits, time.monotonic() - start)
            for item, row in zip(batch, rows):
                if not item.future.done():
                    item.future.set_result(row)
