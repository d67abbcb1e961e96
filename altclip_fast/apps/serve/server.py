"""``altclip-fast serve``'s run: check the extra, bind, load, probe, serve under uvicorn until
SIGTERM/SIGINT (finishing the requests in flight), exit 0."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys

from ...errors import UsageError
from .app import create_app
from .collections import Collections
from .connections import ConnectionLimits, OutOfFilesNotice, guarded_protocol
from .model import ServedModel, use_model_threads
from .options import Listen, ServeOptions

__all__ = ["ACCEPT_BACKLOG", "FILES_SPARE", "INSTALL_HINT", "SERVE_MODULES", "bind", "check_serve_dependencies",
           "connection_cap", "run"]

SERVE_MODULES = ("starlette", "uvicorn", "prometheus_client")
INSTALL_HINT = "pip install 'altclip-fast[serve]'"
FILES_SPARE = 64  # open files kept, beyond those open at start, for logs, threads, health probes: not connections
# The listen backlog, and so how many connections asyncio accepts in one go before any of them is answered
# (a 503 past the cap holds its file until it is sent): the cap leaves room for one such burst.
ACCEPT_BACKLOG = 128


def check_serve_dependencies() -> None:
    missing = []
    for name in SERVE_MODULES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name.replace("_", "-"))
    if missing:
        raise UsageError(f"serve needs {', '.join(missing)}: {INSTALL_HINT}")


def bind(listen: Listen) -> socket.socket:
    """The listening socket, bound before the model loads (a taken port fails fast).

    Made with ``IPPROTO_TCP`` rather than by ``socket.create_server`` (protocol 0): asyncio sets
    ``TCP_NODELAY`` on accepted connections only when the listener says TCP, and without it a client
    that keeps its connection open (the ``openai`` client does) waits ~40 ms on every request after
    its first (Nagle's algorithm against delayed ACKs)."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))
        sock.listen()
        return sock
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {listen.host}:{listen.port} ({exc.strerror or exc})") from None


def connection_cap(wanted: int, in_use: int | None = None) -> tuple[int, str | None]:
    """``--max-connections`` within the open-file limit, so that the cap answers 503 before accept()
    runs out of files: the soft limit is raised toward the hard one if needed, and the cap lowered to
    leave the files open now (``in_use``: counted, after the model loaded), ``FILES_SPARE`` more for
    everything else and ``ACCEPT_BACKLOG`` for a burst of connections accepted at once (a note says so)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return wanted, None
    if in_use is None:
        in_use = len(os.listdir("/dev/fd")) if os.path.isdir("/dev/fd") else 0
    reserved = in_use + FILES_SPARE + ACCEPT_BACKLOG
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + reserved
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if raised > soft:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted, None
    cap = max(1, soft - reserved)
    return cap, f"--max-connections lowered from {wanted} to {cap} to fit the open-file limit ({soft})"


def run(args, session_factory) -> int:
    """Load the model, bind, serve until SIGTERM/SIGINT (finishing requests in flight), return 0."""
    check_serve_dependencies()
    options = ServeOptions.from_args(args)
    collections = Collections(options.collections, options.faiss)  # a bad collection fails before the model loads
    import uvicorn

    sock = bind(Listen.from_args(args))
    session = session_factory()
    use_model_threads(options.threads, session.device)  # before the model loads and warms up
    model = ServedModel.from_session(session)
    model.probe()  # warm up, and fail here rather than on the first request
    host, port = sock.getsockname()[:2]

    cap, note = connection_cap(options.max_connections)

    def ready():
        auth = "API key required" if options.api_key else "no API key"
        if note:
            print(f"altclip-fast serve: {note}", file=sys.stderr, flush=True)
        print(f"altclip-fast serve: {session.describe()}, listening on http://{host}:{port} ({auth})",
              file=sys.stderr, flush=True)

    app = create_app(model, options, on_ready=ready, collections=collections)
    limits = ConnectionLimits(max_connections=cap, keep_alive_s=options.timeout_keep_alive_s,
                              header_s=options.timeout_header_s, body_s=options.timeout_body_s)
    config = uvicorn.Config(app, http=guarded_protocol(limits, app.state.metrics), log_level="warning",
                            access_log=False, backlog=ACCEPT_BACKLOG,
                            timeout_keep_alive=options.timeout_keep_alive_s,
                            timeout_graceful_shutdown=options.timeout_shutdown_s, lifespan="on")
    # uvicorn stops gracefully on SIGTERM/SIGINT (no new connections, requests in flight finished),
    # then raises the signal again under the handlers it found. These handlers make that a clean
    # exit 0 instead of death by signal or a KeyboardInterrupt.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    notice = OutOfFilesNotice()
    logging.getLogger("asyncio").addFilter(notice)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        logging.getLogger("asyncio").removeFilter(notice)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("altclip-fast serve: stopped", file=sys.stderr, flush=True)
    return 0
