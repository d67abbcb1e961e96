"""``altclip-fast serve``'s run: check the extra, bind, load, probe, serve under uvicorn until
SIGTERM/SIGINT (finishing the requests in flight), exit 0."""

from __future__ import annotations

import signal
import socket
import sys

from ...errors import UsageError
from .app import create_app
from .model import ServedModel
from .options import Listen, ServeOptions

__all__ = ["INSTALL_HINT", "SERVE_MODULES", "bind", "check_serve_dependencies", "run"]

SERVE_MODULES = ("starlette", "uvicorn", "prometheus_client")
INSTALL_HINT = "pip install 'altclip-fast[serve]'"


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
    """The listening socket, bound before the model loads (a taken port fails fast)."""
    try:
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        return socket.create_server((listen.host, listen.port), family=family)
    except OSError as exc:
        raise UsageError(f"cannot listen on {listen.host}:{listen.port} ({exc.strerror or exc})") from None


def run(args, session_factory) -> int:
    """Load the model, bind, serve until SIGTERM/SIGINT (finishing requests in flight), return 0."""
    check_serve_dependencies()
    options = ServeOptions.from_args(args)
    import uvicorn

    sock = bind(Listen.from_args(args))
    session = session_factory()
    model = ServedModel.from_session(session)
    model.probe()  # warm up, and fail here rather than on the first request
    host, port = sock.getsockname()[:2]

    def ready():
        auth = "API key required" if options.api_key else "no API key"
        print(f"altclip-fast serve: {session.describe()}, listening on http://{host}:{port} ({auth})",
              file=sys.stderr, flush=True)

    app = create_app(model, options, on_ready=ready)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=60,
                            lifespan="on")
    # uvicorn stops gracefully on SIGTERM/SIGINT (no new connections, requests in flight finished),
    # then raises the signal again under the handlers it found. These handlers make that a clean
    # exit 0 instead of death by signal or a KeyboardInterrupt.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("altclip-fast serve: stopped", file=sys.stderr, flush=True)
    return 0
