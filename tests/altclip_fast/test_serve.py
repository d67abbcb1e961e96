"""``altclip-fast serve`` end to end: the real server in a subprocess on 127.0.0.1 (an ephemeral port),
with a tiny random model; httpx and the official openai client talk to it.

Every answer is compared with the model called directly in this process. Load loops are bounded in
count and time and target only the loopback; each server is killed (its process group) at teardown.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

for _name in ("transformers", "starlette", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(_name)

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from altclip_fast.modeling.model import AltCLIPModel  # noqa: E402
from altclip_fast.preprocessing.processor import AltCLIPProcessor  # noqa: E402
from tests.altclip_fast.processor_fixtures import MULTILINGUAL_TEXTS, make_model_dir, photo_like  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Server:
    """``altclip-fast serve`` in its own process group; ``url`` once it says it listens."""

    def __init__(self, model_dir: Path, *options: str, timeout: float = 120, slow_forward_ms: float = 0):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "_ALTCLIP_FAST_SLOW_FORWARD_MS": str(slow_forward_ms),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.pop("ALTCLIP_FAST_API_KEY", None)
        command = [sys.executable, "-m", "altclip_fast.apps.cli", "serve", "--model", str(model_dir),
                   "--device", "cpu", "--dtype", "fp32", "--host", "127.0.0.1", "--port", "0", *options]
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"the server did not start: {''.join(self.log)[-3000:]}") from None
            if "listening on http://" in line:
                self.url = line.split("listening on ")[1].split()[0]
                assert self.url.startswith("http://127.0.0.1:")
                return
            if self.proc.poll() is not None and self.lines.empty():
                raise AssertionError(f"the server exited: {''.join(self.log)[-3000:]}")

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(model_dir, "--api-key", KEY, "--max-batch-tokens", "64", "--max-batch-images", "4",
                 "--max-wait-ms", "20", "--max-request-bytes", "300000", "--max-request-items", "64")
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def direct(model_dir):
    """The model and processor called directly, one item at a time: the expected rows."""
    model = AltCLIPModel.from_pretrained(model_dir).eval()
    processor = AltCLIPProcessor.from_pretrained(model_dir)

    def norm(x):
        x = x.float()
        return (x / x.norm(dim=-1, keepdim=True)).numpy()

    def text(t: str) -> np.ndarray:
        inputs = processor(text=[t])
        return norm(model.get_text_features(inputs["input_ids"], inputs["attention_mask"]))[0]

    def image(raw: bytes) -> np.ndarray:
        ip = processor.image_processor
        pixels = torch.from_numpy(ip.to_pixel_values([ip.prepare(Image.open(io.BytesIO(raw)))]))
        return norm(model.get_image_features(pixels))[0]

    def tokens(t: str) -> int:
        return len(processor.tokenizer([t], padding=False, return_tensors=None)["input_ids"][0])

    return {"text": text, "image": image, "tokens": tokens, "scale": float(model.logit_scale.detach().exp()),
            "limit": processor.tokenizer.limit()}


def png(width=40, height=32, seed=0, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    photo_like(width, height, seed=seed).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def data_uri(raw: bytes, kind="png") -> str:
    return f"data:image/{kind};base64,{b64(raw)}"


def huge_png_header(width=9000, height=9000) -> bytes:
    """A PNG whose header claims a huge image (the data is never decoded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


TEXTS = [t for t in MULTILINGUAL_TEXTS if t.strip()]  # includes one far over the tiny model's 37 tokens


def embed(client, items, **fields):
    return client.post("/v1/embeddings", json={"model": "altclip", "input": items, **fields})


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


def test_a_single_string_and_base64_encoding(client, direct):
    r = embed(client, "一只猫的照片", encoding_format="base64")
    assert r.status_code == 200, r.text
    row = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(row, direct["text"]("一只猫的照片"), atol=2e-5)


def test_the_openai_client_works_unchanged(server, direct, model_dir):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    texts = ["a photo of a dog", "фото собаки"]
    for fields in ({}, {"encoding_format": "float"}):  # by default the client asks for base64 and decodes it
        result = client.embeddings.create(model="altclip", input=texts, **fields)
        for item, text in zip(result.data, texts):
            np.testing.assert_allclose(item.embedding, direct["text"](text), atol=2e-5)
        assert result.usage.prompt_tokens == sum(direct["tokens"](t) for t in texts)
    assert [m.id for m in client.models.list().data] == [str(model_dir)]  # --served-model-name defaults to --model
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="altclip", input="x")


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


def _counter(metrics: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, (name, metrics)
    return values[0]


def test_classify_reuses_label_rows_and_still_answers_right(client, direct):
    """Labels seen before skip the model; a new label (or the same label under another template) does not."""
    image = png(44, 38, 9)
    texts = {label: direct["text"](f"a picture of {label}") for label in ("owl", "fox", "yak")}

    def classify(labels):
        before = client.get("/metrics").text
        r = client.post("/v1/classify", json={"input": [b64(image)], "labels": labels, "template": "a picture of {}"})
        assert r.status_code == 200, r.text
        after = client.get("/metrics").text
        ran = {name: _counter(after, name) - _counter(before, name)
               for name in ("altclip_label_cache_hits_total", "altclip_label_cache_misses_total")}
        logits = direct["scale"] * direct["image"](image) @ np.stack([texts[label] for label in labels]).T
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        got = {p["label"]: p["probability"] for p in r.json()["data"][0]["predictions"]}
        np.testing.assert_allclose([got[label] for label in labels], expected, atol=1e-5)
        return ran["altclip_label_cache_hits_total"], ran["altclip_label_cache_misses_total"]

    assert classify(["owl", "fox"]) == (0, 2)
    assert classify(["fox", "owl"]) == (2, 0)
    assert classify(["yak", "owl", "yak"]) == (1, 1)


def test_models_health_metrics_and_the_api_key(server, client):
    assert client.get("/v1/models").json()["data"][0]["object"] == "model"
    health = httpx.get(server.url + "/health", timeout=30)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = client.get("/metrics").text
    for name in ("altclip_queue_depth", "altclip_batch_items", "altclip_batch_tokens", "altclip_queue_wait_seconds",
                 "altclip_inference_seconds", "altclip_failures"):
        assert name in metrics
    for route in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + route, timeout=30).status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, headers=headers, timeout=30)
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


def _truncated_jpeg() -> bytes:
    raw = png(64, 64, 7, "JPEG")
    return raw[: len(raw) // 2]


BAD_IMAGES = {
    "not base64": ("!!!not base64!!!", "base64"),
    "not an image": (b64(b"hello, this is text"), "not an image"),
    "tiny 1x1": (b64(png(1, 1)), "1x1"),
    "huge": (b64(huge_png_header()), "9000x9000"),
    "a decompression bomb": (b64(huge_png_header(20000, 20000)), "over the limit"),
    "truncated": (b64(_truncated_jpeg()), "decode"),
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
    assert httpx.get(client.base_url.join("/health"), timeout=30).status_code == 200


# ---------------------------------------------------------------------------------------------- load and shutdown


@pytest.fixture(scope="module")
def slow_server(model_dir):
    """Batches held 400 ms each, a queue of 4 items, two short texts per batch."""
    srv = Server(model_dir, "--max-queue", "4", "--max-batch-tokens", "16",
                 "--max-wait-ms", "5", slow_forward_ms=400)
    yield srv
    srv.kill()


def test_a_burst_gets_429_with_retry_after_and_nothing_breaks(slow_server, direct):
    with httpx.Client(base_url=slow_server.url, timeout=60) as client:
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


def test_a_client_that_leaves_is_dropped_from_its_batch(slow_server):
    with httpx.Client(base_url=slow_server.url, timeout=60) as client:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(embed, client, ["hold the model"])
            time.sleep(0.1)
            with pytest.raises(httpx.TimeoutException):
                httpx.post(slow_server.url + "/v1/embeddings", json={"input": ["leaving"]}, timeout=0.15)
            assert busy.result(30).status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if 'altclip_failures_total{reason="client_disconnected"}' in client.get("/metrics").text:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the disconnected client's item was not dropped")


def test_sigterm_finishes_requests_in_flight_then_exits_0(model_dir, direct):
    srv = Server(model_dir, "--max-batch-tokens", "8", slow_forward_ms=500)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(3) as pool:
            texts = ["a photo of a cat", "ein foto", "un chat noir"]
            futures = [pool.submit(embed, client, [t]) for t in texts]
            time.sleep(0.3)  # all three accepted; at most one batch done
            srv.proc.send_signal(signal.SIGTERM)
            for future, text in zip(futures, texts):
                r = future.result(60)
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(r.json()["data"][0]["embedding"], direct["text"](text), atol=2e-5)
        assert srv.proc.wait(60) == 0, "".join(srv.log)
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)
    finally:
        srv.kill()


# ---------------------------------------------------------------------------------------------- in process


def test_health_turns_unhealthy_when_the_model_breaks(model_dir):
    from starlette.testclient import TestClient

    from altclip_fast.apps.serve import ServedModel, ServeOptions, create_app

    model = AltCLIPModel.from_pretrained(model_dir).eval()
    options = ServeOptions(health_ttl_s=0)
    served = ServedModel(model, AltCLIPProcessor.from_pretrained(model_dir), device=torch.device("cpu"),
                         dtype=torch.float32)
    with TestClient(create_app(served, options)) as client:
        assert client.get("/health").status_code == 200
        with torch.no_grad():
            model.visual_projection.weight.fill_(float("nan"))
        model.prepare()
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "unhealthy" and "non-finite" in r.json()["error"]
        r = client.post("/v1/embeddings", json={"input": [b64(png())], "modality": "image"})
        assert r.status_code == 500 and "inference failed" in r.json()["error"]["message"]
        assert client.post("/v1/embeddings", json={"input": "text still works"}).status_code == 200


def test_without_the_serve_extra_serve_says_how_to_install(model_dir):
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('starlette', 'uvicorn', 'prometheus_client'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import altclip_fast\n"
        "from altclip_fast.apps.cli import main\n"
        f"sys.exit(main(['serve', '--model', {str(model_dir)!r}, '--device', 'cpu']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'altclip-fast[serve]'" in lines[0], proc.stderr
