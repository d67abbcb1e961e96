"""Image requests under hostile traffic (issue 22): the request's pixel budget (413 before anything is
decoded), decoding that stops when its client leaves, and one request's images unable to hold up
another's. The application in process on the tiny model, with ``ServedModel.prepare_image`` (what
runs on each decoded image) slowed down and recorded."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

for _name in ("transformers", "starlette", "prometheus_client", "httpx"):
    pytest.importorskip(_name)

from tests.altclip_fast.apps.serve.helpers import b64, embed, png, post_then_leave  # noqa: E402


class Watched:
    """``prepare_image`` recording the size of each image it is given, then waiting for ``gate`` (open
    unless closed) and taking ``delay_s`` longer."""

    def __init__(self, prepare, delay_s: float):
        self.prepare, self.delay_s, self.calls, self.lock = prepare, delay_s, [], threading.Lock()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, image):
        with self.lock:
            self.calls.append(image.size)
        self.gate.wait(60)
        time.sleep(self.delay_s)
        return self.prepare(image)


@contextlib.contextmanager
def watched_client(app_client, delay_s: float, **options):
    with app_client(**options) as client:
        client.watched = Watched(client.served.prepare_image, delay_s)
        client.served.prepare_image = client.watched
        yield client


def test_a_request_over_the_pixel_budget_is_413_before_any_image_is_decoded(app_client, direct):
    images = [png(40, 32, seed) for seed in range(3)]  # 1280 pixels each
    with watched_client(app_client, 0, max_request_pixels=2600) as client:
        r = embed(client, [b64(raw) for raw in images], modality="image")
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["param"] == "input" and error["message"] == (
            "the request's images hold more than 2600 pixels (input[0] to input[2] hold 3840), over the limit of "
            "2600 per request (--max-request-pixels)")
        assert client.watched.calls == []
        assert 'altclip_failures_total{reason="too_many_pixels"}' in client.get("/metrics").text
        r = client.post("/v1/classify", json={"input": [b64(raw) for raw in images], "labels": ["cat", "dog"]})
        assert r.status_code == 413 and client.watched.calls == []
        r = embed(client, [b64(raw) for raw in images[:2]], modality="image")  # 2560: within the budget
        assert r.status_code == 200, r.text
        for row, raw in zip(r.json()["data"], images):
            np.testing.assert_allclose(row["embedding"], direct["image"](raw), atol=2e-5)


def test_decoding_stops_when_the_client_leaves(app_client):
    with watched_client(app_client, 0.2, preprocess_workers=1) as client:
        body = json.dumps({"input": [b64(png(40, 32, i)) for i in range(10)], "modality": "image"}).encode()
        sent = client.portal.call(post_then_leave, client.app, body, 0.3)
        assert sent[0]["status"] == 499
        time.sleep(0.6)  # an image still queued would be decoded by now
        assert 1 <= len(client.watched.calls) <= 4, client.watched.calls  # 10 were sent, 0.2 s each
        metrics = client.get("/metrics").text
        assert 'altclip_failures_total{reason="client_disconnected_request"}' in metrics


def test_one_requests_images_cannot_hold_up_anothers(app_client, direct):
    """One prep thread; a request of eight images holds it (its first image held at a gate) when a
    request of one image comes. Once the gate opens, the one image is decoded next, not after eight."""
    with watched_client(app_client, 0.05, preprocess_workers=1) as client:
        client.watched.gate.clear()
        raw = png(48, 48, 9)
        with ThreadPoolExecutor(2) as pool:
            many = pool.submit(embed, client, [b64(png(40, 32, i)) for i in range(8)], modality="image")
            deadline = time.monotonic() + 30
            while not client.watched.calls and time.monotonic() < deadline:  # its first image is decoding
                time.sleep(0.01)
            one = pool.submit(embed, client, [b64(raw)], modality="image")
            time.sleep(1.0)  # the one image's header is read and its decode queued (milliseconds of work)
            client.watched.gate.set()
            r = one.result(60)
            assert r.status_code == 200, r.text
            assert many.result(60).status_code == 200
        calls = client.watched.calls
        assert calls[:2] == [(40, 32), (48, 48)] and len(calls) == 9, calls
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], direct["image"](raw), atol=2e-5)
