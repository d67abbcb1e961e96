"""Connections under hostile traffic: read timeouts, a connection cap, and clients that leave quietly.

uvicorn's HTTP/1.1 protocol (h11) closes a connection that sits idle *after* a response, and nothing
else: a connection that never sends, one that sends its headers a byte at a time, and an upload that
stalls all stay open forever, and enough of them exhaust the open-file limit (then every accept fails
and asyncio logs a traceback for each). ``guarded_protocol`` subclasses it with one timer per
connection, whichever phase it is in:

- idle (nothing of a request yet, also on a new connection): ``--timeout-keep-alive``, then closed;
- a request head under way: ``--timeout-header`` from its first byte, then 408 and closed;
- a request body under way: ``--timeout-body`` between two reads, then 408 and closed;
- the application has the whole request: no limit (the batcher and the client's leaving govern it).

Past ``--max-connections`` open connections a new one is answered 503 at once and closed, before a
byte is read. On shutdown, connections reading a request get a short grace (``SHUTDOWN_READ_GRACE_S``)
to make progress instead of the whole graceful-shutdown timeout.

``QuietDisconnects`` is ASGI middleware: a client that leaves mid-upload is a normal event, logged as
one INFO line and counted (``client_disconnected_upload``), not an ERROR traceback.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

__all__ = ["ConnectionGuard", "ConnectionLimits", "OutOfFilesNotice", "QuietDisconnects", "SHUTDOWN_READ_GRACE_S", "guarded_protocol",
           "raw_response"]

logger = logging.getLogger("altclip_fast.serve")
SHUTDOWN_READ_GRACE_S = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1024
    keep_alive_s: float = 5.0
    header_s: float = 10.0
    body_s: float = 30.0


def raw_response(status: int, reason: str, message: str, extra: bytes = b"") -> bytes:
    """A whole ``Connection: close`` HTTP/1.1 response with an OpenAI-style JSON error body."""
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": status}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n").encode()
    return head + extra + b"\r\n" + body


BUSY = raw_response(503, "Service Unavailable", "too many open connections (--max-connections); retry later",
                    b"retry-after: 1\r\n")
HEAD_TIMEOUT = raw_response(408, "Request Timeout", "the request headers took too long (--timeout-header)")
BODY_TIMEOUT = raw_response(408, "Request Timeout", "the request body stalled (--timeout-body)")


def guarded_protocol(limits: ConnectionLimits, metrics=None):
    """uvicorn's h11 protocol class with ``limits`` (pass it as ``uvicorn.Config(http=...)``); ``metrics``
    (anything with ``failure(reason)``) counts each refusal and timeout."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return type("GuardedH11Protocol", (ConnectionGuard, H11Protocol),
                {"limits": limits, "metrics": metrics, "h11": h11})


class ConnectionGuard:
    """The timers and the cap, mixed into uvicorn's ``H11Protocol`` by ``guarded_protocol`` (which sets
    ``limits``, ``metrics`` and the ``h11`` module); it reads the protocol's ``conn``, ``cycle``,
    ``transport``, ``flow``, ``connections`` and ``loop``."""

    limits: ConnectionLimits
    metrics = None
    h11 = None
    _timer = None
    _phase = None
    _stopping = False

    def count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.failure(reason)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.count("too_many_connections")
            self.transport.write(BUSY)
            self.transport.close()
            return
        self._watch()

    def connection_lost(self, exc) -> None:
        self._arm(None, 0)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(progress=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def shutdown(self) -> None:
        self._stopping = True
        super().shutdown()
        self._watch()

    def _watch(self, progress: bool = False) -> None:
        """Arm the timer of the phase the connection is in (a body's restarts on each read)."""
        if self.transport.is_closing():
            return self._arm(None, 0)
        h11, limits, state = self.h11, self.limits, self.conn.their_state
        if state is h11.SEND_BODY:  # also after an early answer (401, 413): the rest keeps the pace
            if progress or self._phase != "body" or self._stopping:
                self._arm("body", min(limits.body_s, SHUTDOWN_READ_GRACE_S) if self._stopping else limits.body_s)
        elif state is h11.IDLE and self.conn.trailing_data[0]:
            if self._phase != "head":  # from the head's first byte, not extended by each one
                self._arm("head", limits.header_s)
        elif state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            self._arm("idle", limits.keep_alive_s)
        else:  # the application has the request
            self._arm(None, 0)

    def _arm(self, phase: str | None, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, phase
        if phase is not None:
            self._timer = self.loop.call_later(seconds, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if phase == "body" and self.flow.read_paused:  # we are the slow one: the app has not read yet
            return self._arm("body", self.limits.body_s)
        if phase == "head" or (phase == "body" and not (self.cycle and self.cycle.response_started)):
            self.count(f"{phase}_timeout")
            self.transport.write(HEAD_TIMEOUT if phase == "head" else BODY_TIMEOUT)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the application's reads end, its writes go nowhere
            self.cycle.message_event.set()
        self.transport.close()


class OutOfFilesNotice(logging.Filter):
    """On asyncio's logger: "socket.accept() out of system resource" with a traceback, once per failed
    accept(), becomes one line saying what to do, at most once every ``every_s`` seconds. (The cap
    should keep accept() from running out of files; this is the net under it.)"""

    def __init__(self, every_s: float = 10.0, clock=None):
        super().__init__()
        import time

        self.every_s, self.clock, self.last = every_s, clock or time.monotonic, None
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s:
            self.dropped += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        record.msg = (f"accept() failed ({error or 'out of resources'}): new connections wait; lower "
                      f"--max-connections or raise the open-file limit (ulimit -n)"
                      + (f" ({self.dropped} more since the last notice)" if self.dropped else ""))
        record.args, record.exc_info, record.exc_text = (), None, None
        self.last, self.dropped = now, 0
        return True


class QuietDisconnects:
    """Wraps an ASGI app: Starlette's ``ClientDisconnect`` (the client left mid-upload, or its upload
    timed out) is one INFO line and a ``client_disconnected_upload`` count, not an ERROR traceback."""

    def __init__(self, app, metrics):
        from starlette.requests import ClientDisconnect

        self.app, self.metrics, self._disconnect = app, metrics, ClientDisconnect
        self.state = getattr(app, "state", None)

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except self._disconnect:
            self.metrics.failure("client_disconnected_upload")
            client = scope.get("client") or ("?", 0)
            logger.info("client %s:%s left during its upload to %s", client[0], client[1], scope.get("path"))
