"""Clients that leave are normal events: no asyncio "exception was never retrieved", no ERROR traceback,
a count in /metrics (and one INFO line). The application runs under uvicorn in a thread on 127.0.0.1;
the client is a raw socket that closes mid-batch or mid-upload."""

from __future__ import annotations

import gc
import json
import logging
import socket
import time

import pytest

for _name in ("transformers", "starlette", "uvicorn", "httpx"):
    pytest.importorskip(_name)

import httpx  # noqa: E402

from altclip_fast.apps.serve.connections import ConnectionLimits  # noqa: E402
from tests.altclip_fast.apps.serve.helpers import b64, png  # noqa: E402


def post_then_leave(port: int, path: str, body: bytes, send: int, wait: float) -> None:
    """Send the head and the first ``send`` bytes of ``body``, wait, and close the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:send])
        time.sleep(wait)


def failures(port: int, reason: str) -> float:
    page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    lines = [line for line in page.splitlines() if line.startswith(f'altclip_failures_total{{reason="{reason}"}}')]
    return float(lines[0].split()[-1]) if lines else 0.0


def wait_for(predicate, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def noise(caplog) -> list[str]:
    gc.collect()  # a never-retrieved exception is reported when its future is freed
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.WARNING or "never retrieved" in r.getMessage()]


def test_a_client_that_leaves_mid_classify_batch_logs_nothing(serving, served_app, caplog, monkeypatch):
    monkeypatch.setenv("_ALTCLIP_FAST_SLOW_FORWARD_MS", "300")
    caplog.set_level(logging.INFO)
    body = json.dumps({"input": [b64(png(40, 40, i)) for i in range(2)], "labels": ["cat", "dog"]}).encode()
    with serving(served_app(max_batch_images=1, max_wait_ms=0), ConnectionLimits(), lifespan="on") as (port, _):
        for _ in range(2):
            post_then_leave(port, "/v1/classify", body, len(body), 0.1)
        wait_for(lambda: failures(port, "client_disconnected_request") >= 2)
        time.sleep(1.0)  # the batches they were in finish
        assert noise(caplog) == []


def test_a_client_that_leaves_mid_upload_is_one_info_line_and_a_count(serving, served_app, caplog):
    caplog.set_level(logging.INFO)
    body = json.dumps({"input": ["x" * 100000]}).encode()
    with serving(served_app(), ConnectionLimits(), lifespan="on") as (port, _):
        post_then_leave(port, "/v1/embeddings", body, 1000, 0.2)
        wait_for(lambda: failures(port, "client_disconnected_upload") == 1)
        assert noise(caplog) == []
        lines = [r.getMessage() for r in caplog.records if r.name == "altclip_fast.serve"]
        assert len(lines) == 1 and "left during its upload to /v1/embeddings" in lines[0], lines
