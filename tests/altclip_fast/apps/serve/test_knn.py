"""The search service (``--collection NAME=DIR``): clip-retrieval's back-end API (``/indices-list``,
``/knn-service``, ``/metadata``) with the fields its ``ClipClient`` and web front send, and ``/v1/search``,
checked against ``search.Index`` and ``altclip-fast search`` on a tiny collection that ``embed --out-dir``
wrote (several shards, so global row ids differ from shard rows)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from altclip_fast.apps.search import Index
from altclip_fast.apps.serve import ServeOptions, create_app, knn
from altclip_fast.apps.serve.collections import Found
from altclip_fast.apps.serve.knn import deduplicate
from altclip_fast.errors import UsageError
from tests.altclip_fast.apps.cli_helpers import cli_main, error_line
from tests.altclip_fast.apps.serve.helpers import AUTH, CAPTIONS, KEY, b64, png

# What clip-retrieval's ClipClient sends besides the query (clip_client.py's defaults).
CLIENT_FIELDS = {"modality": "image", "num_images": 3, "indice_name": "coll", "num_result_ids": 3,
                 "use_mclip": False, "deduplicate": False, "use_safety_model": False,
                 "use_violence_detector": False, "aesthetic_score": 9, "aesthetic_weight": 0.5}


def _global_ids(index: Index, hits) -> list[int]:
    starts = np.cumsum([0] + [len(s) for s in index.shards])
    return [int(starts[index.shard_ids.index(h.shard)] + h.row) for h in hits]


def test_without_a_collection_the_search_routes_do_not_exist(app_client):
    with app_client() as client:
        assert client.get("/indices-list").status_code == 404
        for path in ("/knn-service", "/metadata", "/v1/search"):
            assert client.post(path, json={"text": "x"}).status_code == 404, path


def test_indices_list_names_the_collections(knn_client):
    with knn_client() as client:
        assert client.get("/indices-list").json() == ["coll"]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_knn_service_text_query_is_index_hits(knn_client, collection, direct, modality):
    index = Index(collection, modality)
    hits = index.hits(direct["text"]("a red house"), 3)
    with knn_client() as client:
        reply = client.post("/knn-service", json={**CLIENT_FIELDS, "text": "a red house", "modality": modality})
    assert reply.status_code == 200, reply.text
    got = reply.json()
    assert [r["id"] for r in got] == _global_ids(index, hits)
    np.testing.assert_allclose([r["similarity"] for r in got], [h.score for h in hits], atol=1e-5)
    for r, h in zip(got, hits):
        assert {k: r[k] for k in h.metadata} == h.metadata
        assert {"caption", "image_path"} <= set(r)


def test_knn_service_image_and_embedding_queries(knn_client, collection, direct):
    raw = png(40, 32, seed=3)
    index = Index(collection, "text")
    hits = index.hits(direct["image"](raw), 4)
    with knn_client() as client:
        # as the web front sends an image query: the unused fields empty or null, the ignored ones as strings
        by_image = client.post("/knn-service", json={
            **CLIENT_FIELDS, "text": "", "image": b64(raw), "image_url": None, "modality": "text", "num_images": 4,
            "aesthetic_score": "", "aesthetic_weight": ""}).json()
        query = (direct["image"](raw) * 3.0).tolist()  # the server normalises it
        by_embedding = client.post("/knn-service", json={**CLIENT_FIELDS, "embedding_input": query,
                                                         "modality": "text", "num_images": 4}).json()
    for got in (by_image, by_embedding):
        assert [r["id"] for r in got] == _global_ids(index, hits)
        np.testing.assert_allclose([r["similarity"] for r in got], [h.score for h in hits], atol=1e-5)


def test_the_fronts_metadata_paging(knn_client):
    """The web front pages through ``num_result_ids`` with ``/metadata``, 40 ids at a time, and keeps asking
    past the last result (seen in chromium): an empty ``ids`` is an empty answer. It posts its JSON as
    text/plain (no preflight), and merges ``image`` from the answer into the rows it shows."""
    plain = {"Content-Type": "text/plain;charset=UTF-8"}
    with knn_client() as client:
        empty = client.post("/metadata", content=b'{"ids":[],"indice_name":"coll"}', headers=plain)
        page = client.post("/metadata", content=b'{"ids":[5,2],"indice_name":"coll"}', headers=plain)
    assert empty.status_code == 200 and empty.json() == []
    assert [r["id"] for r in page.json()] == [5, 2]
    assert all(r["metadata"]["image"] and r["metadata"]["caption"] for r in page.json())


def _unit(degrees):
    return np.array([[np.cos(np.radians(d)), np.sin(np.radians(d))] for d in degrees])


def test_deduplicate_keeps_the_best_of_each_linked_group():
    found = [Found(1.0 - i / 10, 0, i, i) for i in range(5)]
    # cos(15 deg) = 0.966 links; cos(25 deg) = 0.906 does not (clip-retrieval's threshold: 0.94)
    assert [f.id for f in deduplicate(found, _unit([0, 15, 90, 40, 180]))] == [0, 2, 3, 4]
    # links chain, as clip-retrieval's connected components do: 30 is linked to 15 only, 15 to 0
    assert [f.id for f in deduplicate(found, _unit([0, 15, 90, 30, 180]))] == [0, 2, 4]
    # a chain seen from its far end first: 45 ~ 30 ~ 15 ~ 0 is one group, the best (45) stays
    assert [f.id for f in deduplicate(found[:4], _unit([45, 0, 15, 30]))] == [0]
    assert [f.id for f in deduplicate(found, _unit([0, 15, 90, 40, 180]), threshold=0.7)] == [0, 2, 4]
    assert deduplicate([], np.zeros((0, 2))) == [] and deduplicate(found[:1], _unit([0])) == found[:1]


def test_deduplicate_drops_the_repeated_image(knn_client, direct, monkeypatch):
    # The tiny random model's image rows are all alike; only the byte-identical copy is near-identical.
    monkeypatch.setattr(knn, "DEDUPLICATE_COSINE", 0.9999)
    query = {**CLIENT_FIELDS, "embedding_input": direct["image"](png(40, 32, seed=0)).tolist(), "num_images": 7,
             "num_result_ids": 7}
    with knn_client() as client:
        everything = client.post("/knn-service", json=query).json()
        unique = client.post("/knn-service", json={**query, "deduplicate": True}).json()
    assert {r["id"] for r in everything[:2]} == {0, 6}  # the two copies of image 0, best first
    assert len(everything) == 7 and len(unique) == 6
    assert unique[0]["id"] in (0, 6) and not {0, 6} <= {r["id"] for r in unique}
    assert [r["id"] for r in unique[1:]] == [r["id"] for r in everything[2:]]


def test_metadata_by_global_id(knn_client, collection):
    index = Index(collection, "image")
    with knn_client() as client:
        reply = client.post("/metadata", json={"ids": [4, 0, 6, 99], "indice_name": "coll"})
    assert reply.status_code == 200
    got = reply.json()
    assert [r["id"] for r in got] == [4, 0, 6, 99]
    # shards of 3 rows: id 4 is shard 1 row 1, id 6 shard 2 row 0
    # the stored columns, plus the row's thumbnail as clip-retrieval's back adds it (test_thumbnails)
    assert {k: v for k, v in got[0]["metadata"].items() if k != "image"} == index.metadata(1, 1)
    assert {k: v for k, v in got[2]["metadata"].items() if k != "image"} == index.metadata(2, 0)
    assert all("image" in r["metadata"] for r in got[:3])
    assert got[1]["metadata"]["caption"] == CAPTIONS[0] and got[3]["metadata"] == {}


def test_v1_search_is_index_hits_and_the_cli_search(knn_client, collection, direct, model_dir, capsys):
    index = Index(collection, "image")
    hits = index.hits(direct["text"]("un chat noir"), 5)
    with knn_client() as client:
        reply = client.post("/v1/search", json={"input": "un chat noir", "collection": "coll", "top_k": 5})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["model"] == "altclip"
    assert [(d["object"], d["index"], d["shard"], d["row"]) for d in body["data"]] == [
        ("search_result", i, h.shard, h.row) for i, h in enumerate(hits)]
    np.testing.assert_allclose([d["score"] for d in body["data"]], [h.score for h in hits], atol=1e-5)
    assert [d["metadata"] for d in body["data"]] == [h.metadata for h in hits]
    capsys.readouterr()
    assert cli_main("search", collection, "--text", "un chat noir", "--top-k", "5", "--json", "--model", model_dir,
                    "--device", "cpu", "--dtype", "fp32", cwd=collection) == 0
    cli = json.loads(capsys.readouterr().out)
    assert [(c["shard"], c["row"]) for c in cli] == [(d["shard"], d["row"]) for d in body["data"]]
    np.testing.assert_allclose([c["score"] for c in cli], [d["score"] for d in body["data"]], atol=1e-5)


def test_v1_search_image_and_embedding_inputs_on_the_text_index(knn_client, collection, direct):
    raw = png(40, 32, seed=5)
    hits = Index(collection, "text").hits(direct["image"](raw), 3)
    with knn_client() as client:
        for modality, value in (("image", b64(raw)), ("embedding", direct["image"](raw).tolist())):
            body = client.post("/v1/search", json={"input": value, "modality": modality, "index": "text",
                                                   "collection": "coll", "top_k": 3}).json()
            assert [(d["shard"], d["row"]) for d in body["data"]] == [(h.shard, h.row) for h in hits], modality
            np.testing.assert_allclose([d["score"] for d in body["data"]], [h.score for h in hits], atol=1e-5)


def test_refusals_have_the_servers_error_shape(knn_client):
    with knn_client() as client:
        url = client.post("/knn-service", json={**CLIENT_FIELDS, "image_url": "http://example.com/a.jpg"})
        assert url.status_code == 400 and url.json()["error"]["param"] == "image_url"
        assert "never fetches" in url.json()["error"]["message"]
        for path, body, param in (("/knn-service", {**CLIENT_FIELDS, "text": "x", "indice_name": "nope"},
                                   "indice_name"),
                                  ("/metadata", {"ids": [1], "indice_name": "nope"}, "indice_name"),
                                  ("/v1/search", {"input": "x", "collection": "nope"}, "collection")):
            reply = client.post(path, json=body)
            assert reply.status_code == 404, path
            assert "'nope'" in reply.json()["error"]["message"] and reply.json()["error"]["param"] == param
        bad = [("/knn-service", {**CLIENT_FIELDS}, 422),  # no query
               ("/knn-service", {**CLIENT_FIELDS, "text": "", "image": None, "image_url": None}, 422),
               ("/knn-service", {**CLIENT_FIELDS, "text": 3}, 422),
               ("/knn-service", {**CLIENT_FIELDS, "embedding_input": [1.0, 2.0]}, 422),  # wrong dims
               ("/knn-service", {**CLIENT_FIELDS, "text": "x", "num_images": 0}, 422),
               ("/knn-service", {**CLIENT_FIELDS, "text": "x", "modality": "audio"}, 422),
               ("/knn-service", {**CLIENT_FIELDS, "image": "not base64 at all!"}, 400),
               ("/metadata", {"ids": ["a"]}, 422),
               ("/v1/search", {"input": "x", "top_k": 10**6}, 422),
               ("/v1/search", {"input": "x", "modality": "embedding"}, 422)]
        for path, body, status in bad:
            reply = client.post(path, json=body)
            assert reply.status_code == status, (path, body, reply.text)
            assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_the_api_key_guards_the_search_routes(knn_client):
    with knn_client(api_key=KEY) as client:
        assert client.get("/indices-list").status_code == 401
        assert client.post("/v1/search", json={"input": "x"}).status_code == 401
        assert client.get("/indices-list", headers=AUTH).json() == ["coll"]
        assert client.post("/v1/search", json={"input": "x"}, headers=AUTH).status_code == 200


def test_a_directory_that_is_no_collection_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"^--collection bad=.*not an embed --out-dir collection"):
        create_app(None, ServeOptions(collections=(("bad", str(tmp_path)),)))
    (tmp_path / "metadata").mkdir()
    with pytest.raises(UsageError, match=r"^--collection bad=.*no img_emb or text_emb shards"):
        create_app(None, ServeOptions(collections=(("bad", str(tmp_path)),)))


def test_requests_are_counted_and_a_bug_is_a_json_500(knn_client, monkeypatch):
    from altclip_fast.apps.serve.collections import Collection

    with knn_client() as client:
        assert client.post("/v1/search", json={"input": "x", "collection": "nope"}).status_code == 404
        assert client.get("/indices-list").status_code == 200

        def broken(self, shard, row):
            raise RuntimeError("a bug")

        monkeypatch.setattr(Collection, "metadata", broken)
        reply = client.post("/v1/search", json={"input": "x"})
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
        metrics = client.get("/metrics").text
    for line in ('altclip_requests_total{route="/v1/search",status="404"} 1.0',
                 'altclip_requests_total{route="/indices-list",status="200"} 1.0',
                 'altclip_requests_total{route="/v1/search",status="500"} 1.0',
                 'altclip_failures_total{reason="collection_not_found"} 1.0'):
        assert line in metrics, line


def test_serve_refuses_a_bad_collection_in_one_line_before_loading_the_model(tmp_path, capsys):
    for value, message in (("nodir", "--collection takes NAME=DIR, got 'nodir'"),
                           (f"a={tmp_path}", f"--collection a={tmp_path}: not an embed --out-dir collection")):
        # the model does not exist: the collection is checked first
        assert cli_main("serve", "--model", tmp_path / "no-model", "--collection", value, cwd=tmp_path) == 2
        assert error_line(capsys).startswith(f"altclip-fast: error: {message}")
