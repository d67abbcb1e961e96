"""Issue 22, the request side: lone surrogates, token arrays, ``GET /v1/models/{id}``, bodies that cost
more to parse than they can hold, classification answers bounded by ``--max-classify-pairs``, long
texts, and a bug in a handler still answered as JSON and counted."""

from __future__ import annotations

import asyncio
import copy
import json

import numpy as np
import pytest

for _name in ("starlette", "prometheus_client", "httpx"):
    pytest.importorskip(_name)

from tests.altclip_fast.apps.serve.helpers import AUTH, KEY, b64, embed, png  # noqa: E402

LIMITS = dict(max_batch_tokens=64, max_batch_images=4, max_wait_ms=5, max_request_bytes=300000,
              max_request_items=64, max_classify_pairs=6, preprocess_workers=2)


@pytest.fixture(scope="module")
def client(app_client):
    with app_client(headers=AUTH, api_key=KEY, **LIMITS) as c:
        yield c


def post(client, path: str, raw: bytes):
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


def requests_counted(client, route: str, status: int) -> float:
    line = f'altclip_requests_total{{route="{route}",status="{status}"}} '
    found = [float(x.split()[-1]) for x in client.get("/metrics").text.splitlines() if x.startswith(line)]
    return found[0] if found else 0.0


def content_ids(client, text: str) -> list[int]:
    """The text's ids as the processor makes them, untruncated, without <s> and </s>."""
    unlimited = copy.deepcopy(client.served.processor.tokenizer)
    unlimited.model_max_length = unlimited.max_text_length = None
    return unlimited([text], padding=False, return_tensors=None)["input_ids"][0][1:-1]


# ---------------------------------------------------------------------------------------------- surrogates


@pytest.mark.parametrize("path,raw,param", [
    ("/v1/embeddings", rb'{"input": "\ud800"}', "input"),
    ("/v1/embeddings", rb'{"input": ["fine", "a\udc00b"]}', "input[1]"),
    ("/v1/embeddings", rb'{"model": "\ud800", "input": "a"}', "model"),
    ("/v1/classify", rb'{"input": ["x"], "labels": ["cat", "\ud83d"]}', "labels[1]"),
    ("/v1/classify", rb'{"input": ["x"], "labels": ["cat"], "template": "a {} \udfff"}', "template"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field_and_counted(client, path, raw, param):
    before = requests_counted(client, path, 400)
    r = post(client, path, raw)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "lone surrogate" in r.json()["error"]["message"]
    assert requests_counted(client, path, 400) == before + 1


def test_a_bug_in_a_handler_is_a_counted_json_500(client, monkeypatch):
    def broken(items):
        raise RuntimeError("a bug")

    monkeypatch.setattr(client.served, "tokenize", broken)
    before = requests_counted(client, "/v1/embeddings", 500)
    r = embed(client, "a")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    assert requests_counted(client, "/v1/embeddings", 500) == before + 1
    assert 'altclip_failures_total{reason="internal"}' in client.get("/metrics").text


# ---------------------------------------------------------------------------------------------- token arrays


def test_token_arrays_embed_as_their_text_does(client):
    texts = ["a photo of a cat", "一只猫的照片", "the cat " * 200]  # the last one over the limit, untruncated
    by_text = embed(client, texts).json()
    arrays = [content_ids(client, t) for t in texts]
    assert len(arrays[2]) > client.served.tokens.limit
    by_ids = embed(client, arrays).json()
    assert by_ids["usage"] == by_text["usage"]
    for a, b in zip(by_ids["data"], by_text["data"]):
        np.testing.assert_array_equal(a["embedding"], b["embedding"])
    one = embed(client, arrays[0]).json()  # a flat list of ints is one token array (compared in a batch of one)
    assert len(one["data"]) == 1
    np.testing.assert_array_equal(one["data"][0]["embedding"], embed(client, texts[0]).json()["data"][0]["embedding"])


@pytest.mark.parametrize("value,param,message", [
    ([[5, 6], [7, 10**6]], "input[1]", "input[1][1] is token id 1000000, outside this model's vocabulary"),
    ([5, -1], "input[1]", "input[1] is token id -1, outside"),
    ([[5, 6], []], "input[1]", "input[1] must not be empty"),
    ([[5, 6], "text"], "input[1]", "input[1] must be a token array"),
    ([[5, "6"]], "input[0]", "input[0][1] must be a token id (an int), got str"),
    ([5, True], "input[1]", "input[1] must be a token id (an int), got bool"),
    (["text", 5], "input[1]", "input[1] must be a string, got int (texts and token arrays cannot be mixed)"),
])
def test_bad_token_arrays_are_422_naming_the_item(client, value, param, message):
    r = embed(client, value)
    assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["message"].startswith(message)


def test_token_arrays_are_text_only(client):
    r = embed(client, [[5, 6]], modality="image")
    assert r.status_code == 422 and r.json()["error"]["param"] == "modality"


# ---------------------------------------------------------------------------------------------- models


def test_one_model_by_id_with_the_openai_client(client):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key=KEY, max_retries=0, http_client=client)
    assert api.models.retrieve("altclip").id == "altclip"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4")
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and r.json()["error"]["code"] == 404
    no_key = client.build_request("GET", "/v1/models/altclip")
    del no_key.headers["authorization"]
    assert client.send(no_key).status_code == 401


def test_a_model_id_with_a_slash(app_client):
    with app_client(model_name="BAAI/AltCLIP") as c:
        assert c.get("/v1/models/BAAI/AltCLIP").json()["id"] == "BAAI/AltCLIP"
        assert c.get("/v1/models/BAAI%2FAltCLIP").status_code == 200
        assert c.get("/v1/models/AltCLIP").status_code == 404


# ---------------------------------------------------------------------------------------------- costly bodies


def test_a_body_of_empty_arrays_is_refused_unparsed(client):
    raw = b'{"input": [' + b"[]," * 90000 + b"[]]}"
    r = post(client, "/v1/embeddings", raw)
    assert r.status_code == 413 and "JSON arrays and objects" in r.json()["error"]["message"], r.text
    brackets = embed(client, ["[[[{{{" * 1000, "[" * 5000])  # in strings they are text
    assert brackets.status_code == 200, brackets.text


def test_the_body_is_parsed_off_the_event_loop(client, monkeypatch):
    from altclip_fast.apps.serve import app

    loops, parse_body = [], app.parse_body

    def spy(*args):
        try:  # a thread that runs no event loop: the loop goes on serving while the body is parsed
            loops.append(asyncio.get_running_loop())
        except RuntimeError:
            loops.append(None)
        return parse_body(*args)

    monkeypatch.setattr(app, "parse_body", spy)
    assert embed(client, "a").status_code == 200
    assert loops == [None], loops


def test_classify_images_times_labels_is_bounded(client):
    images = [b64(png(40, 40, s)) for s in range(3)]
    r = client.post("/v1/classify", json={"input": images, "labels": ["cat", "dog", "owl"]})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["message"] == ("3 images x 3 labels is 9 image-label pairs, over the limit of 6 per "
                                           "request (--max-classify-pairs)")
    assert client.post("/v1/classify", json={"input": images, "labels": ["cat", "dog"]}).status_code == 200


# ---------------------------------------------------------------------------------------------- long text


def test_long_texts_embed_as_the_processor_tokenizes_them(client, direct):
    texts = ["a photo of a cat " * 5000, "猫的照片" * 5000, "x" + " " * 20000 + "a photo of a dog " * 50]
    r = embed(client, texts)
    assert r.status_code == 200, r.text
    processor = client.served.processor.tokenizer
    assert client.served.tokenize(texts) == processor(texts, padding=False, return_tensors=None)["input_ids"]
    for item, text in zip(r.json()["data"], texts):
        np.testing.assert_allclose(item["embedding"], direct["text"](text), atol=2e-5)
    assert r.json()["usage"]["prompt_tokens"] == sum(direct["tokens"](t) for t in texts)


def test_json_with_many_numbers_in_token_arrays_fits(client):
    arrays = [[5] * 2000 for _ in range(20)]
    raw = json.dumps({"input": arrays}).encode()
    assert len(raw) < LIMITS["max_request_bytes"]
    r = post(client, "/v1/embeddings", raw)
    assert r.status_code == 200 and len(r.json()["data"]) == 20, r.text
