"""``SearchBatcher``: concurrent queries for one collection index are searched as one query matrix,
and each gets what a search of its own gives (same rows, scores within float rounding)."""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from altclip_fast.apps.serve.collections import Collection, Collections
from altclip_fast.apps.serve.search_batching import SearchBatcher

DIM = 24
SIZES = [13, 7, 20]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("batched")
    rng = np.random.default_rng(0)
    for name in ("img_emb", "text_emb", "metadata"):
        (root / name).mkdir()
    for shard, n in enumerate(SIZES):
        for name in ("img", "text"):
            rows = rng.standard_normal((n, DIM)) * rng.uniform(0.1, 5, size=(n, 1))
            np.save(root / f"{name}_emb" / f"{name}_emb_{shard}.npy", rows.astype(np.float16))
        pq.write_table(pa.table({"caption": [f"s{shard} r{r}" for r in range(n)]}),
                       root / "metadata" / f"metadata_{shard}.parquet")
    return Collection("c", root)


def _gather(collection, queries, ks, index="image", **batcher):
    async def go():
        pool = Collections()
        calls = []

        async def run(fn, *args):
            calls.append(len(args[1]))
            return await pool.run(fn, *args)

        searcher = SearchBatcher(run, **batcher)
        try:
            found = await asyncio.gather(*(searcher.search(collection, index, q, k) for q, k in zip(queries, ks)))
        finally:
            pool.close()
        return found, calls, searcher.batches
    return asyncio.run(go())


def _same(batched, single):
    assert [(f.shard, f.row, f.id) for f in batched] == [(f.shard, f.row, f.id) for f in single]
    np.testing.assert_allclose([f.score for f in batched], [f.score for f in single], atol=1e-6)


@pytest.mark.parametrize("index", ["image", "text"])
def test_concurrent_queries_are_one_product_with_each_querys_own_results(collection, index):
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((6, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ks = [1, 5, 40, 3, 17, 2]  # 40: more than the collection holds
    found, calls, batches = _gather(collection, queries, ks, index)
    assert calls == [6] and batches == 1
    for q, k, got in zip(queries, ks, found):
        _same(got, collection.search(index, q[None], k)[0])
        assert len(got) == min(k, sum(SIZES))


def test_a_full_group_is_searched_at_once_and_the_rest_waits(collection):
    queries = np.eye(DIM, dtype=np.float32)[:5]
    found, calls, batches = _gather(collection, queries, [3] * 5, max_batch=2, wait_ms=50)
    assert sorted(calls) == [1, 2, 2] and batches == 3
    for q, got in zip(queries, found):
        _same(got, collection.search("image", q[None], 3)[0])


def test_queries_arriving_during_a_search_wait_for_it_as_one_group(collection):
    """While a search runs, later queries (each past the batching window) form one group that starts
    when it ends, not one small group each queued behind it."""
    async def go():
        sizes = []

        async def run(fn, *args):
            sizes.append(len(args[1]))
            await asyncio.sleep(0.15)  # a long scan
            return fn(*args)

        searcher = SearchBatcher(run, wait_ms=2)
        first = asyncio.ensure_future(searcher.search(collection, "image", np.ones(DIM, np.float32), 2))
        await asyncio.sleep(0.03)
        later = []
        for i in range(5):
            later.append(asyncio.ensure_future(searcher.search(collection, "image", np.eye(DIM, dtype=np.float32)[i], 3)))
            await asyncio.sleep(0.01)  # five times the window apart
        return await first, await asyncio.gather(*later), sizes
    first, later, sizes = asyncio.run(go())
    assert sizes == [1, 5]
    for i, got in enumerate(later):
        _same(got, collection.search("image", np.eye(DIM, dtype=np.float32)[i][None], 3)[0])


def test_a_failed_search_fails_every_query_of_its_group(collection):
    async def go():
        async def run(fn, *args):
            raise RuntimeError("boom")

        searcher = SearchBatcher(run)
        return await asyncio.gather(*(searcher.search(collection, "image", np.ones(DIM, np.float32), 2)
                                      for _ in range(3)), return_exceptions=True)
    assert [str(e) for e in asyncio.run(go())] == ["boom"] * 3


def test_a_cancelled_query_leaves_its_group(collection):
    async def go():
        sizes = []

        async def run(fn, *args):
            sizes.append(len(args[1]))
            return fn(*args)

        searcher = SearchBatcher(run, wait_ms=20)
        keep = asyncio.ensure_future(searcher.search(collection, "image", np.ones(DIM, np.float32), 2))
        leave = asyncio.ensure_future(searcher.search(collection, "image", -np.ones(DIM, np.float32), 2))
        await asyncio.sleep(0)
        leave.cancel()
        return await keep, sizes
    found, sizes = asyncio.run(go())
    assert sizes == [1] and len(found) == 2
