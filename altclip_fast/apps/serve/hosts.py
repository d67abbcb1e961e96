"""Without an API key, only requests addressed to this server: a ``Host`` check, as plain ASGI middleware.

A server with no key trusts whoever can reach it, and a web page in a browser can reach 127.0.0.1
through DNS rebinding: its own name (``evil.example``) is made to resolve to 127.0.0.1, and the
browser then sends the page's requests here with ``Host: evil.example``. A rebound request always
carries the attacker's *name*, so the rule is: an IP address (v4, or v6 in brackets) or ``localhost``
is fine, any other name must be allowed by ``--allow-host`` (``*``: any). A refusal is 421 in
OpenAI's error shape. With a key set, the key is the protection and this check is not installed.
"""

from __future__ import annotations

import ipaddress
import json

__all__ = ["HostCheck", "host_name", "is_allowed"]

LOCAL_NAMES = ("localhost",)


def _refusal(host: str) -> bytes:
    message = (f"this server does not answer for Host {host[:100]!r}: without an API key it answers only for "
               "IP addresses, localhost and the names given with --allow-host")
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": 421}}).encode()


def host_name(host: str) -> str:
    """The name in a ``Host`` header, without the port and a final dot, lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # [v6]:port
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


def is_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    name = host_name(host)
    if not name or "*" in allowed or name in LOCAL_NAMES or name in {host_name(a) for a in allowed}:
        return True
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Wraps an ASGI app; refuses HTTP requests for a foreign ``Host`` (counted as ``foreign_host`` by
    ``metrics.failure``). ``state`` is the wrapped app's, so ``app.state`` reads the same through it."""

    def __init__(self, app, allowed: tuple[str, ...], metrics):
        self.app, self.allowed, self.metrics = app, tuple(allowed), metrics
        self.state = getattr(app, "state", None)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
            if not is_allowed(host, self.allowed):
                self.metrics.failure("foreign_host")
                body = _refusal(host)
                await send({"type": "http.response.start", "status": 421, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
