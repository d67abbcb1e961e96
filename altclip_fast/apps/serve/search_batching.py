"""``SearchBatcher``: concurrent searches of one collection index gathered into one matrix product.

The first query for a (collection, index) opens a group; queries arriving within ``wait_ms`` join it
(up to ``max_batch``), and the group is searched as one ``[q, dim]`` query matrix for the largest ``k``
asked, each query then keeping its own first ``k``: the same rows as a search of its own, since the
top ``k`` of a larger top list is the top ``k``. The scan over the shards, which dominates a large
collection's search, is then read once per group rather than once per query. While a group of an
index is being searched, its next group keeps filling and starts when that search ends: closing it
after ``wait_ms`` would queue one small group after another behind the running search, each paying
the whole scan (at 1M rows, 32 concurrent clients' searches ran one by one: 1.3x one client's rate).
Pure asyncio; the searches themselves run where ``run`` puts them (the search thread).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

__all__ = ["SEARCH_MAX_BATCH", "SEARCH_WAIT_MS", "SearchBatcher"]

SEARCH_WAIT_MS = 2.0
SEARCH_MAX_BATCH = 64


class SearchBatcher:
    """``await batcher.search(collection, index, row, k, engine)``: one query's results, searched with the
    other queries for the same index and engine ("exact" or "faiss") that arrive within ``wait_ms``.
    ``run(fn, *args)`` runs ``fn`` off the event loop (``Collections.run``)."""

    def __init__(self, run: Callable[..., Awaitable], *, wait_ms: float = SEARCH_WAIT_MS,
                 max_batch: int = SEARCH_MAX_BATCH):
        self.run, self.wait_s, self.max_batch = run, wait_ms / 1000, max_batch
        self.pending: dict[tuple[str, str, str], list] = {}
        self.busy: set[tuple[str, str, str]] = set()  # keys with a group being searched
        self.batches = 0  # groups searched (a test's window on the grouping)

    async def search(self, collection, index: str, row: np.ndarray, k: int, engine: str = "exact") -> list:
        loop = asyncio.get_running_loop()
        key = (collection.name, index, engine)
        future = loop.create_future()
        group = self.pending.setdefault(key, [])
        group.append((row, k, future))
        if key not in self.busy:  # else the running search's end starts this group
            if len(group) >= self.max_batch:
                self._start(key, collection)
            elif len(group) == 1:
                loop.call_later(self.wait_s, self._start, key, collection, group)
        return await future

    def _start(self, key, collection, group=None) -> None:
        """Search up to ``max_batch`` pending queries of ``key``, unless a search of ``key`` is running
        (when ``group`` is given, a timer's: only if that group is still the pending one)."""
        current = self.pending.get(key)
        if key in self.busy or current is None or (group is not None and current is not group):
            return
        taken, rest = current[:self.max_batch], current[self.max_batch:]
        if rest:
            self.pending[key] = rest
        else:
            del self.pending[key]
        self.busy.add(key)
        task = asyncio.ensure_future(self._flush(collection, key, taken))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _flush(self, collection, key: tuple[str, str, str], group: list) -> None:
        try:
            await self._search(collection, key[1:], group)
        finally:
            self.busy.discard(key)
            self._start(key, collection)  # what arrived meanwhile has waited long enough

    async def _search(self, collection, how: tuple[str, str], group: list) -> None:
        live = [(row, k, f) for row, k, f in group if not f.done()]  # a cancelled request is dropped
        if not live:
            return
        self.batches += 1
        queries = np.stack([row for row, _, _ in live])
        try:
            found = await self.run(collection.search, how[0], queries, max(k for _, k, _ in live), how[1])
        except Exception as exc:  # every query of the group fails with it
            for _, _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, k, future), results in zip(live, found):
            if not future.done():
                future.set_result(results[:k])
