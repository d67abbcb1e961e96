"""Request bodies and images for the serve tests (a helper module, not a test module)."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

from tests.altclip_fast.processor_fixtures import MULTILINGUAL_TEXTS, photo_like

# The captions of the conftest's ``collection``: image 6 repeats image 0 (and its caption).
CAPTIONS = ["a red house", "ein blauer Himmel", "un chat noir", "一只狗", "a green field", "la mer", "a red house"]
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = [t for t in MULTILINGUAL_TEXTS if t.strip()]  # includes one far over the tiny model's 37 tokens


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


def truncated_jpeg() -> bytes:
    raw = png(64, 64, 7, "JPEG")
    return raw[: len(raw) // 2]


def embed(client, items, **fields):
    return client.post("/v1/embeddings", json={"model": "altclip", "input": items, **fields})


def counter(metrics: str, name: str) -> float:
    """The value of an unlabelled metric in a Prometheus text page."""
    values = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, (name, metrics)
    return values[0]


async def post_then_leave(app, body: bytes, leave_after_s: float) -> list[dict]:
    """One ASGI POST /v1/embeddings whose client disconnects ``leave_after_s`` after the app first waits
    for a message past the body; the messages the app sent."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/embeddings", "raw_path": b"/v1/embeddings", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(leave_after_s)
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent
