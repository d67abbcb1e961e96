"""The application in process: ``create_app`` on a tiny random model, driven through starlette's
TestClient (the real lifespan, batcher, model thread and prep threads; no socket, no subprocess).

Every answer is compared with the model called directly. What needs a real process (the CLI's console
lines, a socket, signals, a missing extra) is in ``test_server.py``.
"""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

for _name in ("transformers", "starlette", "prometheus_client", "httpx"):
    pytest.importorskip(_name)

from tests.altclip_fast.apps.serve.helpers import (  # noqa: E402
    AUTH, KEY, TEXTS, b64, counter, data_uri, embed, huge_png_header, png, post_then_leave, truncated_jpeg,
)

LIMITS = dict(max_batch_tokens=64, max_batch_images=4, max_wait_ms=20, max_request_bytes=300000,
              max_request_items=64, preprocess_workers=2)


@pytest.fixture(scope="module")
def client(app_client):
    """As ``altclip-fast serve --api-key KEY --max-batch-tokens 64 --max-batch-images 4 --max-wait-ms 20
    --max-request-bytes 300000 --max-request-items 64`` would serve."""
    with app_client(headers=AUTH, api_key=KEY, **LIMITS) as c:
        yield c


def without_key(client, method: str, url: str, headers=None, **kwargs):
    """A request with no Authorization header at all (the client's default one removed), or ``headers``."""
    request = client.build_request(method, url, **kwargs)
    del request.headers["authorization"]
    request.headers.update(headers or {})
    return client.send(request)


def assert_good_request(client, direct):
    """After any bad input, a good request still works."""
    r = embed(client, ["a photo of a cat"])
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], direct["text"]("a photo of a cat"), atol=2e-5)


# ---------------------------------------------------------------------------------------------- happy paths


def test_text_embeddings_match_the_model_with_usage(client, direct):
    r = embed(client, TEXTS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    for item, text in zip(body["data"], TEXTS):
        row = np.array(item["embedding"])
        np.testing.assert_allclose(row, direct["text"](text), atol=2e-5)
        assert abs(np.linalg.norm(row) - 1) < 1e-5
    # Too-long texts are truncated to the model's limit, as the CLI does; usage counts what was embedded.
    tokens = sum(direct["tokens"](t) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert max(direct["tokens"](t) for t in TEXTS) == direct["limit"]
    assert body["model"] == "altclip"


def test_a_single_string_and_base64_encoding(client, direct):
    r = embed(client, "一只猫的照片", encoding_format="base64")
    assert r.status_code == 200, r.text
    row = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(row, direct["text"]("一只猫的照片"), atol=2e-5)


def test_the_openai_client_works_in_process(client, direct):
    """The official client, its HTTP going through the in-process app (TestClient is an httpx.Client);
    ``test_server.py`` runs it against the real server too."""
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key=KEY, max_retries=0, http_client=client)
    texts = ["a photo of a dog", "фото собаки"]
    for fields in ({}, {"encoding_format": "float"}):  # by default the client asks for base64 and decodes it
        result = api.embeddings.create(model="altclip", input=texts, **fields)
        for item, text in zip(result.data, texts):
            np.testing.assert_allclose(item.embedding, direct["text"](text), atol=2e-5)
        assert result.usage.prompt_tokens == sum(direct["tokens"](t) for t in texts)
    assert [m.id for m in api.models.list().data] == ["altclip"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="wrong", max_retries=0,
                      http_client=client).embeddings.create(model="altclip", input="x")


def test_image_embeddings_data_uri_and_plain_base64(client, direct):
    images = [png(40, 32, 1), png(50, 70, 2, "JPEG"), png(33, 33, 3)]
    items = [data_uri(images[0]), b64(images[1]), data_uri(images[2], "jpeg")]
    r = embed(client, items, modality="image")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 0
    for item, raw in zip(r.json()["data"], images):
        np.testing.assert_allclose(item["embedding"], direct["image"](raw), atol=2e-5)


def test_classify_gives_the_cli_probabilities(client, direct):
    images = [png(40, 40, 4), png(60, 45, 5)]
    labels = ["cat", "dog", "一只狗"]
    r = client.post("/v1/classify", json={"input": [b64(i) for i in images], "labels": labels,
                                          "template": "a photo of a {}"})
    assert r.status_code == 200, r.text
    texts = np.stack([direct["text"](f"a photo of a {label}") for label in labels])
    for item, raw in zip(r.json()["data"], images):
        logits = direct["scale"] * direct["image"](raw) @ texts.T
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        got = {p["label"]: p["probability"] for p in item["predictions"]}
        np.testing.assert_allclose([got[label] for label in labels], expected, atol=1e-5)
        probabilities = [p["probability"] for p in item["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True)


@pytest.mark.parametrize("body,status,message", [
    ({"input": ["x"], "labels": ["cat"], "template": "no slot"}, 422,
     "template must contain {} where the label goes, got 'no slot'"),
    ({"input": ["x"], "labels": ["cat", " "]}, 422, "labels must not be blank"),
    ({"input": ["x"]}, 422, "labels is required"),
])
def test_classify_refuses_bad_labels_and_templates(client, body, status, message):
    r = client.post("/v1/classify", json=body)
    assert r.status_code == status and r.json()["error"]["message"] == message, r.text


def test_classify_reuses_label_rows_and_still_answers_right(client, direct):
    """Labels seen before skip the model; a new label (or the same label under another template) does not."""
    image = png(44, 38, 9)
    texts = {label: direct["text"](f"a picture of {label}") for label in ("owl", "fox", "yak")}

    def classify(labels):
        before = client.get("/metrics").text
        r = client.post("/v1/classify", json={"input": [b64(image)], "labels": labels, "template": "a picture of {}"})
        assert r.status_code == 200, r.text
        after = client.get("/metrics").text
        ran = {name: counter(after, name) - counter(before, name)
               for name in ("altclip_label_cache_hits_total", "altclip_label_cache_misses_total")}
        logits = direct["scale"] * direct["image"](image) @ np.stack([texts[label] for label in labels]).T
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        got = {p["label"]: p["probability"] for p in r.json()["data"][0]["predictions"]}
        np.testing.assert_allclose([got[label] for label in labels], expected, atol=1e-5)
        return ran["altclip_label_cache_hits_total"], ran["altclip_label_cache_misses_total"]

    assert classify(["owl", "fox"]) == (0, 2)
    assert classify(["fox", "owl"]) == (2, 0)
    assert classify(["yak", "owl", "yak"]) == (1, 1)


def test_models_health_metrics_and_the_api_key(client):
    assert client.get("/v1/models").json()["data"][0]["object"] == "model"
    health = without_key(client, "GET", "/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = client.get("/metrics").text
    for name in ("altclip_queue_depth", "altclip_batch_items", "altclip_batch_tokens", "altclip_queue_wait_seconds",
                 "altclip_inference_seconds", "altclip_failures"):
        assert name in metrics
    for route in ("/v1/models", "/metrics"):
        assert without_key(client, "GET", route).status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = without_key(client, "POST", "/v1/embeddings", headers=headers, json={"input": "x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
    assert 'altclip_failures_total{reason="unauthorized"}' in client.get("/metrics").text


def test_concurrent_clients_each_get_exactly_their_rows(client, direct):
    """24 clients at once, each with its own texts (different lengths) or images."""
    words = "a photo of the cat dog black white red car house tree".split()

    def job(i):
        if i % 4 == 3:
            raws = [png(30 + i, 40 + 2 * i, seed=100 + i)]
            r = embed(client, [b64(raw) for raw in raws], modality="image")
            return r, [direct["image"](raw) for raw in raws]
        texts = [" ".join(words[(i + k) % len(words)] for k in range(1 + (i * 7 + j * 3) % 11)) + f" {i}"
                 for j in range(1 + i % 3)]
        return embed(client, texts), [direct["text"](t) for t in texts]

    deadline = time.monotonic() + 90
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(job, range(24), timeout=90))
    assert time.monotonic() < deadline
    for r, expected in results:
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]])
        np.testing.assert_allclose(got, np.stack(expected), atol=2e-5)


# ---------------------------------------------------------------------------------------------- bad input


def _post_raw(client, content: bytes, headers=None):
    return client.post("/v1/embeddings", content=content, headers={"Content-Type": "application/json", **(headers or {})})


BAD_BODIES = {
    "malformed json": (b'{"input": ["a", }', 400, "JSON"),
    "not an object": (b'["a"]', 422, "object"),
    "input missing": (b'{"model": "altclip"}', 422, "input"),
    "input a number": (b'{"input": 5}', 422, "input"),
    "input empty": (b'{"input": []}', 422, "input"),
    "token arrays": (b'{"input": ["a", [1, 2]]}', 422, "input[1]"),
    "model not a string": (b'{"model": 3, "input": "a"}', 422, "model"),
    "encoding_format": (b'{"input": "a", "encoding_format": "hex"}', 422, "encoding_format"),
    "modality": (b'{"input": "a", "modality": "audio"}', 422, "modality"),
    "dimensions": (b'{"input": "a", "dimensions": 7}', 422, "dimensions"),
    "too many items": (json.dumps({"input": ["a"] * 65}).encode(), 413, "64"),
    "body too large": (json.dumps({"input": ["a" * 1000] * 400}).encode(), 413, "300000"),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_requests_name_the_field_and_hurt_nothing(client, direct, name):
    content, status, expected = BAD_BODIES[name]
    r = _post_raw(client, content)
    assert r.status_code == status, r.text
    assert expected in r.json()["error"]["message"]
    assert_good_request(client, direct)


BAD_IMAGES = {
    "not base64": ("!!!not base64!!!", "base64"),
    "not an image": (b64(b"hello, this is text"), "not an image"),
    "tiny 1x1": (b64(png(1, 1)), "1x1"),
    "huge": (b64(huge_png_header()), "9000x9000"),
    "a decompression bomb": (b64(huge_png_header(20000, 20000)), "over the limit"),
    "truncated": (b64(truncated_jpeg()), "decode"),
    "a URL": ("https://example.com/cat.jpg", "not fetched"),
    "a data URI without base64": ("data:image/png,abc", "data:image"),
    "elongated": (b64(png(400, 9)), "elongated"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_a_bad_image_fails_its_own_request_naming_the_item(client, direct, name):
    item, expected = BAD_IMAGES[name]
    good = [b64(png(40, 40, 11))]
    with ThreadPoolExecutor(2) as pool:  # a good image request in the same batching window
        good_future = pool.submit(embed, client, good, modality="image")
        bad = embed(client, [good[0], item], modality="image")
        good_response = good_future.result(60)
    assert bad.status_code == 400, bad.text
    message = bad.json()["error"]["message"]
    assert message.startswith("input[1]:") and expected in message, message
    assert good_response.status_code == 200
    np.testing.assert_allclose(good_response.json()["data"][0]["embedding"], direct["image"](png(40, 40, 11)),
                               atol=2e-5)
    assert_good_request(client, direct)
    assert without_key(client, "GET", "/health").status_code == 200


# ---------------------------------------------------------------------------------------------- load


@pytest.fixture
def slow_client(app_client, monkeypatch):
    """Batches held 400 ms each, a queue of 4 items, two short texts per batch."""
    monkeypatch.setenv("_ALTCLIP_FAST_SLOW_FORWARD_MS", "400")
    with app_client(max_queue=4, max_batch_tokens=16, max_wait_ms=5) as c:
        yield c


def test_a_burst_gets_429_with_retry_after_and_nothing_breaks(slow_client, direct):
    client = slow_client

    def one(i):
        return embed(client, [f"cat {i}", f"dog {i}"])

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(one, range(10), timeout=60))
    codes = sorted(r.status_code for r in responses)
    assert 429 in codes and 200 in codes, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["error"]["message"]
    assert embed(client, ["a"] * 5).status_code == 413  # never fits the queue
    assert 'altclip_failures_total{reason="queue_full"}' in client.get("/metrics").text
    assert_good_request(client, direct)


def test_a_client_that_leaves_is_dropped_from_its_batch(slow_client):
    client = slow_client
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(embed, client, ["hold the model"])
        time.sleep(0.1)
        body = json.dumps({"input": ["leaving"]}).encode()
        sent = client.portal.call(post_then_leave, client.app, body, 0.15)
        assert sent[0]["status"] == 499
        assert busy.result(30).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if 'altclip_failures_total{reason="client_disconnected"}' in client.get("/metrics").text:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the disconnected client's item was not dropped")


# ---------------------------------------------------------------------------------------------- faults


def test_health_turns_unhealthy_when_the_model_breaks(app_client):
    import torch

    with app_client(health_ttl_s=0) as client:
        model = client.served.model
        assert client.get("/health").status_code == 200
        with torch.no_grad():
            model.visual_projection.weight.fill_(float("nan"))
        model.prepare()
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "unhealthy" and "non-finite" in r.json()["error"]
        r = client.post("/v1/embeddings", json={"input": [b64(png())], "modality": "image"})
        assert r.status_code == 500 and "inference failed" in r.json()["error"]["message"]
        assert client.post("/v1/embeddings", json={"input": "text still works"}).status_code == 200
