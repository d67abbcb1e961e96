"""``Index.search`` against a brute-force float64 cosine top-k on small synthetic collections: rows of
very different norms (so a missing or wrong norm scaling changes the ranking), shards of uneven sizes
scored in chunks that divide none of them, and k spanning several chunks (so the running merge
decides most of the answer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from altclip_fast.apps.search import Index

DIM = 48
SIZES = [37, 53, 11, 29]  # chunk_rows=7 divides none of them
CHUNK = 7


def _collection(root, dtypes, seed=0):
    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    shards = []
    for shard, (n, dtype) in enumerate(zip(SIZES, dtypes)):
        x = rng.standard_normal((n, DIM)) * rng.uniform(0.05, 20.0, size=(n, 1))
        if shard == 2:
            x[4] = 0.0  # scores 0 (normalize's eps), not NaN
        x = x.astype(dtype)
        np.save(root / "img_emb" / f"img_emb_{shard}.npy", x)
        shards.append(x.astype(np.float64))
    return shards


def _brute_force(shards, queries):
    rows = np.concatenate(shards)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return queries @ rows.T


def _check(index, shards, queries, k):
    dense = _brute_force(shards, np.atleast_2d(queries).astype(np.float64))
    scores, shard_ids, row_ids = index.search(queries, k)
    k = min(k, dense.shape[1])
    assert scores.shape == shard_ids.shape == row_ids.shape == (dense.shape[0], k)
    # the k best scores, best first (exact up to float32 rounding)
    np.testing.assert_allclose(scores, -np.sort(-dense, axis=1)[:, :k], atol=2e-6)
    # and each reported (shard, row) really has the score reported for it: ties may swap rows, nothing else
    starts = np.cumsum([0] + [len(s) for s in shards])
    flat = starts[shard_ids] + row_ids
    assert ((row_ids >= 0) & (row_ids < np.asarray([len(s) for s in shards])[shard_ids])).all()
    np.testing.assert_allclose(np.take_along_axis(dense, flat, axis=1), scores, atol=2e-6)
    assert all(len(set(r)) == k for r in flat.tolist())
    return scores, flat


@pytest.mark.parametrize("dtypes", [[np.float16] * 4, [np.float32] * 4, [np.float16, np.float32] * 2],
                         ids=["float16", "float32", "mixed"])
@pytest.mark.parametrize("nq", [1, 5])
def test_search_matches_brute_force(tmp_path, dtypes, nq):
    shards = _collection(tmp_path, dtypes)
    index = Index(tmp_path, chunk_rows=CHUNK, device="cpu")
    queries = np.random.default_rng(1).standard_normal((nq, DIM)).astype(np.float32) * 3
    # the first search computes the rows' norms, the second reuses them: both must agree
    first = _check(index, shards, queries, 20)
    assert all(n is not None for n in index._inv_norms)
    second = _check(index, shards, queries, 20)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    _check(index, shards, queries, 1)
    _check(index, shards, queries, 1000)  # more than the collection: every row, ranked
    # the default chunk (larger than every shard) ranks the same
    _check(Index(tmp_path, device="cpu"), shards, queries, 20)


def test_one_dimensional_query_and_stored_row_finds_itself(tmp_path):
    shards = _collection(tmp_path, [np.float16] * 4)
    index = Index(tmp_path, chunk_rows=CHUNK, device="cpu")
    scores, shard_ids, row_ids = index.search(shards[1][40].astype(np.float32), k=3)
    assert scores.shape == (1, 3)
    assert (int(shard_ids[0, 0]), int(row_ids[0, 0])) == (1, 40) and scores[0, 0] > 0.9999
    _check(index, shards, shards[3][5].astype(np.float32), 12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtypes", [[np.float16] * 4, [np.float32] * 4], ids=["float16", "float32"])
def test_search_on_the_gpu_matches_brute_force(tmp_path, dtypes):
    """The chunks cross to the GPU (float16 ones at their own width) and are scored there."""
    shards = _collection(tmp_path, dtypes)
    index = Index(tmp_path, chunk_rows=CHUNK, device="cuda")
    queries = np.random.default_rng(2).standard_normal((3, DIM)).astype(np.float32)
    for k in (1, 20, 1000):
        _check(index, shards, queries, k)
