"""``Authorization: Bearer KEY`` on every route but ``/health``, as plain ASGI middleware.

The keys are compared as SHA-256 digests with ``hmac.compare_digest``: constant time, and no length
leaks either. A refusal is OpenAI's error shape, 401, with ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import hashlib
import hmac
import json

__all__ = ["BearerAuth", "UNAUTHORIZED"]

UNAUTHORIZED = json.dumps({"error": {"message": "missing or wrong API key (Authorization: Bearer KEY)",
                                     "type": "invalid_request_error", "param": None, "code": 401}}).encode()
OPEN_PATHS = ("/health",)


class BearerAuth:
    """Wraps an ASGI app; ``metrics`` (anything with ``failure(reason)``) counts each refusal as
    ``unauthorized``. ``state`` is the wrapped app's, so ``app.state`` reads the same through it."""

    def __init__(self, app, key: str, metrics):
        self.app, self.metrics = app, metrics
        self._digest = hashlib.sha256(key.encode()).digest()
        self.state = getattr(app, "state", None)

    def allows(self, headers) -> bool:
        """Whether ASGI ``headers`` (a list of byte pairs) carry the right bearer key."""
        given = b""
        for name, value in headers:
            if name == b"authorization":
                given = value
        scheme, _, token = given.partition(b" ")
        ok = hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self._digest)
        return scheme.lower() == b"bearer" and ok

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS and not self.allows(scope.get("headers", [])):
            self.metrics.failure("unauthorized")
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(UNAUTHORIZED)).encode()),
                (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": UNAUTHORIZED})
            return
        await self.app(scope, receive, send)
