"""BearerAuth alone, around a stub ASGI app."""

from __future__ import annotations

import asyncio
import json

import pytest

from altclip_fast.apps.serve.auth import BearerAuth


class Failures:
    def __init__(self):
        self.reasons = []

    def failure(self, reason, count=1):
        self.reasons.append(reason)


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def call(app, path="/v1/models", authorization: bytes | None = None, kind="http"):
    headers = [(b"host", b"x")] + ([(b"authorization", authorization)] if authorization is not None else [])
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    asyncio.run(app({"type": kind, "path": path, "headers": headers}, receive, send))
    return sent


@pytest.mark.parametrize("authorization", [None, b"", b"Bearer wrong", b"key-1", b"Basic key-1", b"Bearer",
                                           b"Bearer key-1x"])
def test_a_missing_or_wrong_key_is_401_with_www_authenticate(authorization):
    failures = Failures()
    sent = call(BearerAuth(_ok, "key-1", failures), authorization=authorization)
    start, body = sent
    assert start["status"] == 401
    headers = dict(start["headers"])
    assert headers[b"www-authenticate"] == b"Bearer" and headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body["body"])
    assert json.loads(body["body"]) == {"error": {
        "message": "missing or wrong API key (Authorization: Bearer KEY)", "type": "invalid_request_error",
        "param": None, "code": 401}}
    assert failures.reasons == ["unauthorized"]


@pytest.mark.parametrize("authorization", [b"Bearer key-1", b"bearer key-1", b"BEARER  key-1 "])
def test_the_right_key_passes(authorization):
    failures = Failures()
    assert call(BearerAuth(_ok, "key-1", failures), authorization=authorization)[0]["status"] == 200
    assert failures.reasons == []


def test_health_and_non_http_scopes_need_no_key():
    auth = BearerAuth(_ok, "key-1", Failures())
    assert call(auth, path="/health")[0]["status"] == 200
    assert call(auth, kind="lifespan")[0]["status"] == 200
