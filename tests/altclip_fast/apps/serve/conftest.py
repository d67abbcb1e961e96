"""Fixtures for the serve tests: a tiny random model directory, the model called directly (the
expected rows), and the application in process (``app_client``: starlette's TestClient, which runs
the app's lifespan, so the batcher and its threads are the real ones)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from tests.altclip_fast.processor_fixtures import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="session")
def direct(model_dir):
    """The model and processor called directly, one item at a time: the expected rows."""
    import torch
    from PIL import Image

    from altclip_fast.modeling.model import AltCLIPModel
    from altclip_fast.preprocessing.processor import AltCLIPProcessor

    model = AltCLIPModel.from_pretrained(model_dir).eval()
    processor = AltCLIPProcessor.from_pretrained(model_dir)

    def norm(x):
        x = x.float()
        return (x / x.norm(dim=-1, keepdim=True)).detach().numpy()

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


def served_model(model_dir):
    """A fresh ``ServedModel`` (fp32 on CPU) of the tiny model."""
    import torch

    from altclip_fast.apps.serve import ServedModel
    from altclip_fast.modeling.model import AltCLIPModel
    from altclip_fast.preprocessing.processor import AltCLIPProcessor

    model = AltCLIPModel.from_pretrained(model_dir).eval()
    return ServedModel(model, AltCLIPProcessor.from_pretrained(model_dir), device=torch.device("cpu"),
                       dtype=torch.float32)


@pytest.fixture(scope="session")
def app_client(model_dir):
    """``app_client(**options)``: a context manager giving a TestClient on ``create_app`` with those
    ``ServeOptions`` (``headers=`` sets the client's default headers)."""
    from starlette.testclient import TestClient

    from altclip_fast.apps.serve import ServeOptions, create_app

    @contextlib.contextmanager
    def make(headers=None, **options):
        served = served_model(model_dir)
        with TestClient(create_app(served, ServeOptions(**options)), base_url="http://127.0.0.1",
                        headers=headers or {}) as client:
            client.served = served
            yield client

    return make


@pytest.fixture
def serving():
    """``serving(app, limits, **config)``: a context manager running ``app`` under uvicorn with the
    guarded protocol in a thread, on 127.0.0.1 (an ephemeral port), yielding ``(port, server)``; the
    server is stopped at exit (``server.should_exit``) and its thread joined."""
    import threading
    import time

    import uvicorn

    from altclip_fast.apps.serve.connections import guarded_protocol
    from altclip_fast.apps.serve.options import Listen
    from altclip_fast.apps.serve.server import bind

    @contextlib.contextmanager
    def run(app, limits, **config):
        sock = bind(Listen("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, http=guarded_protocol(limits), log_level="warning",
                                               timeout_keep_alive=limits.keep_alive_s, **{"lifespan": "off", **config}))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        server.thread = thread
        try:
            yield sock.getsockname()[1], server
        finally:
            server.should_exit = True
            thread.join(30)

    return run


@pytest.fixture
def served_app(model_dir):
    """``served_app(**options)``: ``create_app`` on a fresh tiny ``ServedModel`` (for ``serving``)."""
    from altclip_fast.apps.serve import ServeOptions, create_app

    return lambda **options: create_app(served_model(model_dir), ServeOptions(**options))


@pytest.fixture(scope="session")
def collection(tmp_path_factory, model_dir):
    """A collection ``embed --out-dir --with-text`` wrote from 7 captioned images (``images/``, beside it)
    in shards of 3; image 6 repeats image 0 byte for byte."""
    from tests.altclip_fast.apps.cli_helpers import cli_main
    from tests.altclip_fast.apps.serve.helpers import CAPTIONS, png

    root = tmp_path_factory.mktemp("knn")
    folder = root / "images"
    folder.mkdir()
    for i, caption in enumerate(CAPTIONS):
        (folder / f"im{i}.png").write_bytes(png(40, 32, seed=0 if i == 6 else i))
        (folder / f"im{i}.txt").write_text(caption, encoding="utf-8")
    out = root / "coll"
    # A relative input from its parent folder: the server, started elsewhere, must still find the images.
    assert cli_main("embed", "images", "--out-dir", out, "--with-text", "--shard-size", 3, "--model", model_dir,
                    "--device", "cpu", "--dtype", "fp32", "--workers", "0", "--no-progress", cwd=root) == 0
    return out


@pytest.fixture
def knn_client(app_client, collection):
    """``knn_client(**options)``: ``app_client`` serving ``collection`` as "coll"."""
    return lambda **options: app_client(collections=(("coll", str(collection)),), **options)
