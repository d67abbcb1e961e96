"""The optional faiss index (``--faiss NAME[=FOLDER]``): its ids are the collection's global row ids even
over more than 10 unpadded shards (``img_emb_10.npy`` sorts before ``img_emb_2.npy``, as clip-retrieval's
reader lists them), a flat index answers what exact search answers, an HNSW one finds most of it, replies
say which answered, and an index that does not fit the collection is refused at start-up."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from altclip_fast.apps.serve import ServeOptions, create_app
from altclip_fast.apps.serve.collections import Collections
from altclip_fast.apps.serve.knn import ENGINE_HEADER
from altclip_fast.apps.serve.search_batching import SearchBatcher
from altclip_fast.errors import UsageError
from tests.altclip_fast.apps.cli_helpers import cli_main, error_line

faiss = pytest.importorskip("faiss")

DIM = 32
SIZES = [9, 4, 12, 7, 1, 10, 6, 11, 3, 8, 5, 13]  # 12 shards, numbered 0..11 without padding
DUPLICATE = (3, 20)  # global row 20 repeats row 3 (another shard): deduplicate must drop one


def _write_collection(root, rng):
    for name in ("img_emb", "text_emb", "metadata"):
        (root / name).mkdir(parents=True)
    image_rows = []
    for shard, n in enumerate(SIZES):
        for name in ("img", "text"):
            rows = rng.standard_normal((n, DIM)).astype(np.float32)
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            if name == "img":
                image_rows.append(rows)
            np.save(root / f"{name}_emb" / f"{name}_emb_{shard}.npy", rows.astype(np.float16))
        pq.write_table(pa.table({"caption": [f"shard {shard} row {r}" for r in range(n)]}),
                       root / "metadata" / f"metadata_{shard}.parquet")
    return image_rows


def reader_order(folder) -> list:
    """The ``.npy`` files as clip-retrieval's index (embedding-reader) reads them: paths sorted as text."""
    return sorted((p for p in folder.rglob("*.npy")), key=str)


def _stacked(folder) -> np.ndarray:
    return np.concatenate([np.load(p).astype(np.float32) for p in reader_order(folder)])


def build_index(folder, out, kind="flat", metric=None, rows=None):
    """A faiss index over ``folder``'s shards in reader order (or over ``rows``), written to ``out``."""
    data = _stacked(folder) if rows is None else rows
    metric = faiss.METRIC_INNER_PRODUCT if metric is None else metric
    if kind == "flat":
        index = faiss.IndexFlat(data.shape[1], metric)
    else:  # searched with a wider beam than faiss's default (16), as autofaiss tunes it
        index = faiss.IndexHNSWFlat(data.shape[1], 16, metric)
        index.hnsw.efConstruction, index.hnsw.efSearch = 80, 64
    index.add(data)
    faiss.write_index(index, str(out))
    return data


@pytest.fixture(scope="module")
def unpadded(tmp_path_factory):
    """A 12-shard collection with clip-retrieval inference's unpadded names, a flat ``image.index`` in
    its folder, and no ``text.index``."""
    root = tmp_path_factory.mktemp("faiss") / "coll"
    rows = _write_collection(root, np.random.default_rng(0))
    # global row DUPLICATE[1] (shard 11, after shards 0, 1 and 10 in reader order) becomes row DUPLICATE[0]
    shard, row = _locate(DUPLICATE[1])
    copy = np.load(root / "img_emb" / f"img_emb_{shard}.npy")
    copy[row] = np.concatenate(rows)[_numeric_to_reader(DUPLICATE[0])].astype(np.float16)
    np.save(root / "img_emb" / f"img_emb_{shard}.npy", copy)
    build_index(root / "img_emb", root / "image.index")
    return root


def _reader_shards() -> list[int]:
    return sorted(range(len(SIZES)), key=lambda s: f"img_emb_{s}.npy")


def _locate(gid: int) -> tuple[int, int]:
    """(shard, row) of a global row id, with ids counted in reader order."""
    for shard in _reader_shards():
        if gid < SIZES[shard]:
            return shard, gid
        gid -= SIZES[shard]
    raise IndexError(gid)


def _numeric_to_reader(gid: int) -> int:
    """The index, in numeric shard order, of the row with reader-order id ``gid``."""
    shard, row = _locate(gid)
    return sum(SIZES[:shard]) + row


def _queries(n=8, seed=1):
    q = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _ids(found):
    """Each query's (shard, row, id) list; equal scores (the duplicated row) in id order, as exact search
    may order a tie either way."""
    return [[(f.shard, f.row, f.id) for f in sorted(one, key=lambda f: (-round(f.score, 5), f.id))]
            for one in found]


def test_the_fixture_exercises_reader_order():
    # text order is not numeric order past 10 shards: 10 and 11 come right after 1
    assert _reader_shards()[:4] == [0, 1, 10, 11]


def test_a_flat_index_answers_what_exact_search_answers_with_global_ids(unpadded):
    coll = Collections([("c", str(unpadded))], [("c", None)]).get("c")
    assert coll.engine("image") == "faiss" and coll.engine("text") == "exact"  # no text.index
    queries = _queries()
    exact, approx = coll.search("image", queries, 10), coll.search("image", queries, 10, "faiss")
    assert _ids(approx) == _ids(exact)
    np.testing.assert_allclose([[f.score for f in q] for q in approx], [[f.score for f in q] for q in exact],
                               atol=1e-6)
    # each global id is that row in reader order: its metadata names the shard and row it came from
    for f in approx[0]:
        assert _locate(f.id) == (f.shard, f.row)
        assert coll.metadata(f.shard, f.row)["caption"] == f"shard {f.shard} row {f.row}"


def test_hnsw_finds_most_of_exact_and_scores_by_the_stored_rows(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "big"
    for name in ("img_emb", "metadata"):
        (root / name).mkdir(parents=True)
    sizes = [700, 700, 600]
    for shard, n in enumerate(sizes):
        rows = rng.standard_normal((n, DIM)).astype(np.float32)
        np.save(root / "img_emb" / f"img_emb_{shard}.npy", (rows / np.linalg.norm(rows, axis=1, keepdims=True))
                .astype(np.float16))
        pq.write_table(pa.table({"caption": [str(r) for r in range(n)]}),
                       root / "metadata" / f"metadata_{shard}.parquet")
    stacked = build_index(root / "img_emb", root / "image.index", kind="hnsw")
    coll = Collections([("c", str(root))], [("c", None)]).get("c")
    queries = _queries(50, seed=3)
    exact, approx = coll.search("image", queries, 10), coll.search("image", queries, 10, "faiss")
    recall = np.mean([len({f.id for f in a} & {f.id for f in e}) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9, recall
    for query, found in zip(queries, approx):
        rows = stacked[[f.id for f in found]]
        cosines = rows @ query / np.linalg.norm(rows, axis=1)
        np.testing.assert_allclose([f.score for f in found], cosines, atol=1e-5)
        assert all(a.score >= b.score for a, b in zip(found, found[1:]))  # sorted by those scores


def test_batched_faiss_searches_are_one_call_with_each_querys_results(unpadded):
    coll = Collections([("c", str(unpadded))], [("c", None)]).get("c")
    queries = _queries(6, seed=4)
    ks = [1, 5, 10, 3, 7, 2]

    async def go():
        pool, calls = Collections(), []

        async def run(fn, *args):
            calls.append((len(args[1]), args[3]))
            return await pool.run(fn, *args)

        batcher = SearchBatcher(run, wait_ms=200)
        try:
            searches = (batcher.search(coll, "image", q, k, "faiss") for q, k in zip(queries, ks))
            return await asyncio.gather(*searches), calls
        finally:
            pool.close()

    found, calls = asyncio.run(go())
    assert calls == [(6, "faiss")]
    assert [_ids([f])[0] for f in found] == [_ids(coll.search("image", q[None], k, "faiss"))[0]
                                             for q, k in zip(queries, ks)]


@pytest.fixture
def faiss_client(app_client, unpadded):
    return lambda **options: app_client(collections=(("c", str(unpadded)),), **options)


def test_replies_say_which_search_answered(faiss_client, unpadded):
    query = _queries(1, seed=5)[0]
    exact_coll = Collections([("c", str(unpadded))]).get("c")
    expected = _ids(exact_coll.search("image", query[None], 5))[0]
    with faiss_client(faiss=(("c", None),)) as client:
        default = client.post("/v1/search", json={"input": query.tolist(), "modality": "embedding", "top_k": 5})
        forced = client.post("/v1/search", json={"input": query.tolist(), "modality": "embedding", "top_k": 5,
                                                 "search": "exact"})
        text = client.post("/v1/search", json={"input": query.tolist(), "modality": "embedding", "index": "text"})
        no_text_index = client.post("/v1/search", json={"input": query.tolist(), "modality": "embedding",
                                                        "index": "text", "search": "faiss"})
        knn = client.post("/knn-service", json={"embedding_input": query.tolist(), "modality": "image",
                                                "num_images": 5})
        knn_text = client.post("/knn-service", json={"embedding_input": query.tolist(), "modality": "text"})
    for reply, engine in ((default, "faiss"), (forced, "exact"), (text, "exact"), (knn, "faiss"), (knn_text, "exact")):
        assert reply.status_code == 200, reply.text
        assert reply.headers[ENGINE_HEADER] == engine
    assert default.json()["search"] == "faiss" and forced.json()["search"] == "exact"
    assert text.json()["search"] == "exact"
    for reply in (default, forced):
        assert [(d["shard"], d["row"], d["id"]) for d in reply.json()["data"]] == expected
    assert [r["id"] for r in knn.json()] == [e[2] for e in expected]
    assert isinstance(knn.json(), list)  # clip-retrieval's body shape, untouched
    assert no_text_index.status_code == 422 and no_text_index.json()["error"]["param"] == "search"
    with faiss_client() as client:  # without --faiss, exact search answers
        plain = client.post("/v1/search", json={"input": query.tolist(), "modality": "embedding", "top_k": 5})
        bad = client.post("/v1/search", json={"input": query.tolist(), "modality": "embedding", "search": "hnsw"})
    assert plain.json()["search"] == "exact" and plain.headers[ENGINE_HEADER] == "exact"
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "search"


def test_deduplicate_works_on_faiss_results(faiss_client, unpadded):
    stored = _stacked(unpadded / "img_emb")
    query = stored[DUPLICATE[0]]
    body = {"embedding_input": query.tolist(), "modality": "image", "num_images": 10, "num_result_ids": 10}
    replies = {}
    for engine, options in (("faiss", {"faiss": (("c", None),)}), ("exact", {})):
        with faiss_client(**options) as client:
            everything = client.post("/knn-service", json=body)
            unique = client.post("/knn-service", json={**body, "deduplicate": True})
        assert everything.headers[ENGINE_HEADER] == unique.headers[ENGINE_HEADER] == engine
        replies[engine] = (everything.json(), unique.json())
    everything, unique = replies["faiss"]
    assert {r["id"] for r in everything[:2]} == set(DUPLICATE)
    assert len(unique) == len(everything) - 1 and not set(DUPLICATE) <= {r["id"] for r in unique}
    assert [r["id"] for r in everything[:2]] == sorted(DUPLICATE)  # a tie: the lower id first
    for got, want in zip(replies["faiss"], replies["exact"]):
        # exact search may order the tie either way: the same rows, then the same list after it
        tie = 2 if len(got) == len(everything) else 1
        assert {r["id"] for r in got[:tie]} <= set(DUPLICATE) and {r["id"] for r in want[:tie]} <= set(DUPLICATE)
        assert [r["id"] for r in got[tie:]] == [r["id"] for r in want[tie:]]
        np.testing.assert_allclose([r["similarity"] for r in got], [r["similarity"] for r in want], atol=1e-6)


def _refused(root, faiss_pairs, match):
    with pytest.raises(UsageError, match=match) as info:
        Collections([("c", str(root))], faiss_pairs)
    assert "\n" not in str(info.value)


def test_an_index_that_does_not_fit_the_collection_is_refused(unpadded, tmp_path):
    stacked = _stacked(unpadded / "img_emb")
    build_index(None, tmp_path / "image.index", rows=stacked[:-1])  # one row short: built from other shards
    _refused(unpadded, [("c", str(tmp_path))], rf"^--faiss c: .*image\.index holds {len(stacked) - 1} rows, "
                                               rf"the collection {len(stacked)}")
    build_index(None, tmp_path / "image.index", rows=np.zeros((len(stacked), 16), np.float32))
    _refused(unpadded, [("c", str(tmp_path))], r"^--faiss c: .*image\.index has 16 dims, .* 32$")
    build_index(None, tmp_path / "image.index", rows=stacked, metric=faiss.METRIC_L2)
    _refused(unpadded, [("c", str(tmp_path))], r"^--faiss c: .*does not rank by inner product")
    (tmp_path / "image.index").write_bytes(b"not an index")
    _refused(unpadded, [("c", str(tmp_path))], r"^--faiss c: .*is not a faiss index")
    (tmp_path / "image.index").unlink()
    _refused(unpadded, [("c", str(tmp_path))], r"^--faiss c: .* holds no image\.index or text\.index")
    _refused(unpadded, [("other", None)], r"^--faiss other: no --collection other=DIR")


def test_without_faiss_installed_the_opt_in_is_refused(unpadded, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    _refused(unpadded, [("c", None)], r"^--faiss c: faiss is not installed: pip install 'altclip-fast\[index\]'")
    assert Collections([("c", str(unpadded))]).get("c").engine("image") == "exact"  # not opted in: no faiss needed


def test_serve_refuses_a_mismatched_index_in_one_line_before_loading_the_model(unpadded, tmp_path, capsys):
    build_index(None, tmp_path / "image.index", rows=np.zeros((3, DIM), np.float32))
    # the model does not exist: the collections and their indexes are checked first
    assert cli_main("serve", "--model", tmp_path / "no-model", "--collection", f"c={unpadded}",
                    "--faiss", f"c={tmp_path}", cwd=tmp_path) == 2
    assert error_line(capsys).startswith(f"altclip-fast: error: --faiss c: {tmp_path / 'image.index'} holds 3 rows")


def test_create_app_opens_the_faiss_index(unpadded):
    with pytest.raises(UsageError, match="holds no image.index"):
        create_app(None, ServeOptions(collections=(("c", str(unpadded)),), faiss=(("c", str(unpadded / "metadata")),)))
