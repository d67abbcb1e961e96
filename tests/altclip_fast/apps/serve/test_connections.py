"""Connections under hostile traffic, on a real socket (127.0.0.1 only) against uvicorn with the guarded
protocol in a thread and a stub application: TCP_NODELAY, the idle, header and body timeouts, the
connection cap and a shutdown that does not wait on stalled uploads. Every test opens a bounded number
of connections, each with a socket timeout, and closes them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import statistics
import time

import pytest

for _name in ("starlette", "uvicorn", "h11"):
    pytest.importorskip(_name)

from altclip_fast.apps.serve.connections import SHUTDOWN_READ_GRACE_S, ConnectionLimits  # noqa: E402
from altclip_fast.apps.serve.options import Listen  # noqa: E402
from altclip_fast.apps.serve.server import ACCEPT_BACKLOG, FILES_SPARE, bind, connection_cap  # noqa: E402


async def echo_length(scope, receive, send):
    """Reads the whole body, answers its length (head and body in two writes, as Starlette does)."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size, more = size + len(message.get("body", b"")), message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def connect(port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One response with a content-length body, from a kept-open connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = int(lengths[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_the_listening_socket_says_tcp_so_accepted_connections_get_nodelay():
    sock = bind(Listen("127.0.0.1", 0))
    assert sock.proto == socket.IPPROTO_TCP

    async def accepted_nodelay() -> int:
        seen = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            value = await asyncio.wait_for(seen, 10)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0


def test_requests_on_a_kept_open_connection_wait_for_no_delayed_ack(serving):
    with serving(echo_length, ConnectionLimits()) as (port, _), connect(port) as sock:
        times = []
        for _ in range(40):  # without TCP_NODELAY each one after the first takes ~40 ms
            start = time.perf_counter()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            times.append(time.perf_counter() - start)
    assert statistics.median(times[1:]) < 0.02, times


def test_a_silent_connection_is_closed_after_the_keep_alive_timeout(serving):
    with serving(echo_length, ConnectionLimits(keep_alive_s=0.5)) as (port, _), connect(port) as sock:
        start = time.monotonic()
        assert read_until_closed(sock) == b""
        assert 0.3 < time.monotonic() - start < 5


def test_headers_sent_a_byte_at_a_time_get_408_after_the_header_timeout(serving):
    with serving(echo_length, ConnectionLimits(keep_alive_s=0.3, header_s=1.0)) as (port, _), connect(port) as sock:
        start = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with contextlib.suppress(OSError):  # trickle for longer than the limit: each byte must not extend it
            while time.monotonic() - start < 4:
                sock.sendall(b"X")
                time.sleep(0.1)
        reply = read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == 408
        assert time.monotonic() - start < 4.5


async def refuse_unread(scope, receive, send):
    """Answers 401 without reading the body, as BearerAuth does."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


def test_after_a_response_a_slow_next_head_and_a_trickled_unread_body_are_cut(serving):
    limits = ConnectionLimits(keep_alive_s=5, header_s=0.8, body_s=0.8)
    with serving(echo_length, limits) as (port, _), connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\n")  # the next head, never finished: the idle timer must not apply
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - start < 3
    with serving(refuse_unread, limits) as (port, _), connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        start = time.monotonic()
        with contextlib.suppress(OSError):  # a byte every 0.5 s keeps the pace; then it stalls
            for _ in range(4):
                sock.sendall(b"x")
                time.sleep(0.5)
        assert read_until_closed(sock).startswith(b"HTTP/1.1 401 ")
        assert 2 < time.monotonic() - start < 5


def test_a_stalled_upload_gets_408_after_the_body_timeout_and_a_slow_one_does_not(serving):
    with serving(echo_length, ConnectionLimits(body_s=0.6)) as (port, _):
        with connect(port) as sock:  # 3 bytes every 0.2 s: slow, never stalled
            sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 30\r\n\r\n")
            for _ in range(10):
                time.sleep(0.2)
                sock.sendall(b"abc")
            assert read_response(sock).endswith(b"\r\n\r\n30")
        with connect(port) as sock:
            start = time.monotonic()
            sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n0123456789")
            reply = read_until_closed(sock)
            assert reply.startswith(b"HTTP/1.1 408 "), reply
            assert 0.4 < time.monotonic() - start < 5


def test_past_the_connection_cap_a_new_connection_gets_503_at_once(serving):
    with serving(echo_length, ConnectionLimits(max_connections=3)) as (port, _), contextlib.ExitStack() as held:
        for _ in range(3):
            held.enter_context(connect(port))
        time.sleep(0.2)
        with connect(port) as extra:
            reply = read_until_closed(extra)  # before it sent anything
        assert reply.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in reply.lower(), reply
        held.close()
        time.sleep(0.2)
        with connect(port) as sock:  # the held ones gone, there is room again
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")


def test_shutdown_does_not_wait_for_stalled_uploads(serving):
    with serving(echo_length, ConnectionLimits(body_s=30), timeout_graceful_shutdown=30) as (port, server), \
            contextlib.ExitStack() as held:
        for _ in range(5):
            sock = held.enter_context(connect(port))
            sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n0123456789")
        time.sleep(0.3)
        start = time.monotonic()
        server.should_exit = True
        server.thread.join(20)
        assert not server.thread.is_alive()
        assert time.monotonic() - start < SHUTDOWN_READ_GRACE_S + 3


def test_the_connection_cap_fits_the_open_file_limit(monkeypatch):
    resource = pytest.importorskip("resource")
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1024))
    monkeypatch.setattr(resource, "setrlimit", lambda *_: pytest.fail("the hard limit is already reached"))
    cap, note = connection_cap(1024, in_use=40)
    # room for the files open now, the spare ones, and one burst of accepted connections
    assert cap == 1024 - 40 - FILES_SPARE - ACCEPT_BACKLOG and f"lowered from 1024 to {cap} " in note
    assert connection_cap(100, in_use=40) == (100, None)


def test_accept_running_out_of_files_is_one_line_now_and_then(caplog):
    from altclip_fast.apps.serve.connections import OutOfFilesNotice

    now = [0.0]
    notice = OutOfFilesNotice(every_s=10, clock=lambda: now[0])
    log = logging.getLogger("asyncio")
    log.addFilter(notice)
    try:
        for t in (0, 0.5, 1, 11, 12):
            now[0] = t
            try:
                raise OSError(24, "Too many open files")
            except OSError as exc:
                log.error("socket.accept() out of system resource\nsocket: <fd=3>", exc_info=exc)
        log.error("something else")
    finally:
        log.removeFilter(notice)
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert [r.exc_info for r in records] == [None, None, None]
    assert "Too many open files" in records[0].getMessage() and "\n" not in records[0].getMessage()
    assert "(2 more since the last notice)" in records[1].getMessage()
    assert records[2].getMessage() == "something else"
