"""The server's settings, each declared once: its default, ``--help`` text, minimum and flag.

A setting is a dataclass field whose metadata (see ``setting``) names its flag; ``add_arguments``
generates the argparse arguments (defaults, help, argument groups, in field order) from the fields,
and ``from_args`` checks every minimum (``--max-queue must be at least 1, got 0``) and builds the
dataclasses back from the parsed arguments. Nothing here imports the web stack.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from ... import environment
from ...errors import UsageError

__all__ = ["API_KEY_ENV", "HEALTH_TTL_S", "Listen", "ServeOptions", "add_arguments", "check_minimums", "cli_default",
           "flag_fields", "parse_collections", "parse_faiss", "parse_origins", "served_name", "setting"]

API_KEY_ENV = "ALTCLIP_FAST_API_KEY"
HEALTH_TTL_S = 5.0
SERVER = "server"
LIMITS = "batching and limits"
CONNECTIONS = "connections and hosts"
SEARCH = "search service"


def setting(default: Any = MISSING, *, flag: str | None = None, help: str | None = None,  # noqa: A002
            minimum: float | None = None, group: str = LIMITS, dest: str | None = None,
            default_factory: Callable[[], Any] | Any = MISSING, cli_default: Any = MISSING) -> Any:
    """A dataclass field with what its command-line flag needs. ``flag=None``: settable from code only.
    ``dest`` is the argparse name when it is not the field's (it also makes the metavar ``--help`` shows);
    ``cli_default`` is the flag's default when it differs from the field's (``None``: worked out from
    other flags, see ``ServeOptions.from_args``)."""
    metadata = {"flag": flag, "help": help, "minimum": minimum, "group": group, "dest": dest}
    if cli_default is not MISSING:
        metadata["cli_default"] = cli_default
    return field(default=default, default_factory=default_factory, metadata=metadata)


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class Listen:
    """Where the server listens (only ``run`` needs these)."""

    host: str = setting("127.0.0.1", flag="--host", group=SERVER,
                        help="address to bind (default: 127.0.0.1, this machine only)")
    port: int = setting(8000, flag="--port", group=SERVER, help="port (default: 8000; 0 picks a free one)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Listen:
        return cls(**{f.name: getattr(args, _dest(f)) for f in flag_fields(cls)})


@dataclass
class ServeOptions:
    """What the application needs: limits, the key, the model's name. Field order is ``--help`` order."""

    api_key: str | None = setting(
        None, flag="--api-key", group=SERVER,
        help=f"require Authorization: Bearer KEY on every route but /health (or set {API_KEY_ENV})")
    model_name: str = setting("altclip", flag="--served-model-name", group=SERVER, dest="served_model_name",
                              cli_default=None,
                              help="the model id /v1/models lists (default: the --model folder's name, or the hub id)")
    max_batch_tokens: int = setting(8192, flag="--max-batch-tokens", minimum=1,
                                    help="real tokens per text batch (default: 8192)")
    max_batch_images: int = setting(32, flag="--max-batch-images", minimum=1, help="images per batch (default: 32)")
    max_wait_ms: float = setting(5.0, flag="--max-wait-ms", minimum=0,
                                 help="longest wait for a batch to fill (default: 5)")
    max_queue: int = setting(1024, flag="--max-queue", minimum=1,
                             help="queued items before answering 429 (default: 1024)")
    max_request_bytes: int = setting(
        4 * 1024 * 1024, flag="--max-request-bytes", minimum=1,
        help="largest request body, else 413 (default: 4 MiB: room for a few photos in base64, which is 4/3 of "
             "the file; the whole body is read and parsed before any field is checked, so a larger limit costs "
             "memory and parse time per request)")
    max_request_items: int = setting(1024, flag="--max-request-items", minimum=1,
                                     help="inputs per request, else 413; keep it at most --max-queue, which must "
                                          "hold a whole request (default: 1024)")
    max_classify_pairs: int = setting(65536, flag="--max-classify-pairs", minimum=1,
                                      help="images x labels per /v1/classify request, else 413: the answer holds "
                                           "one probability per pair (default: 65536)")
    label_cache_size: int = setting(4096, flag="--label-cache", minimum=0,
                                    help="classification label rows kept for reuse, least recently used out first; "
                                         "0 keeps none (default: 4096)")
    preprocess_workers: int = setting(default_factory=_default_workers, flag="--preprocess-workers", minimum=1,
                                      help="threads that tokenize and decode images (default: up to 4)")
    threads: int = setting(0, flag="--threads", minimum=0,
                           help="CPU threads of the model's forward pass (default: 0, torch's choice, a thread "
                                "per core, at most the cores this process may use)")
    max_request_pixels: int = setting(
        120_000_000, flag="--max-request-pixels", minimum=1,
        help="image pixels per request, summed from the image headers before any is decoded, else 413 "
             "(default: 120000000, three images at the 40-megapixel limit per image)")
    health_ttl_s: float = setting(HEALTH_TTL_S)  # how long a /health probe's answer is reused
    allow_hosts: tuple[str, ...] = setting(
        (), flag="--allow-host", group=CONNECTIONS, cli_default=None,
        help="without an API key, answer requests whose Host header is this name too (repeatable; '*': any); "
             "by default only IP addresses and localhost, which a web page cannot rebind")
    max_connections: int = setting(1024, flag="--max-connections", minimum=1, group=CONNECTIONS,
                                   help="open connections before new ones get 503 (default: 1024, lowered to fit "
                                        "the open-file limit)")
    timeout_keep_alive_s: float = setting(5.0, flag="--timeout-keep-alive", minimum=0.1, group=CONNECTIONS,
                                          help="seconds a connection may sit idle between requests (default: 5)")
    timeout_header_s: float = setting(10.0, flag="--timeout-header", minimum=0.1, group=CONNECTIONS,
                                      help="seconds to send a request's headers, from its first byte (default: 10)")
    timeout_body_s: float = setting(30.0, flag="--timeout-body", minimum=0.1, group=CONNECTIONS,
                                    help="longest pause while sending a request body, else 408 (default: 30)")
    timeout_shutdown_s: float = setting(60.0, flag="--timeout-graceful-shutdown", minimum=0.1, group=CONNECTIONS,
                                        help="on SIGTERM, seconds to finish the requests in flight (default: 60)")

    collections: tuple[tuple[str, str], ...] = setting(
        (), flag="--collection", group=SEARCH, cli_default=None,
        help="NAME=DIR: serve the collection embed --out-dir wrote in DIR under NAME, searched by /v1/search and "
             "clip-retrieval's /knn-service, /metadata and /indices-list (repeatable; none: no search routes)")
    faiss: tuple[tuple[str, str | None], ...] = setting(
        (), flag="--faiss", group=SEARCH, cli_default=None,
        help="NAME or NAME=FOLDER: answer the searches of --collection NAME with the faiss index clip-retrieval "
             "index wrote (image.index, text.index) in its DIR, or in FOLDER, instead of exact search (repeatable; "
             "needs the [index] extra; /v1/search replies say which answered, in search)")
    thumbnail_size: int = setting(
        256, flag="--thumbnail-size", minimum=0, group=SEARCH,
        help="longest side in pixels of the JPEG thumbnails added to search results as 'image', for rows whose "
             "file lies below the collection's recorded input folder (default: 256; 0: no thumbnails)")
    thumbnail_cache_mb: int = setting(
        64, flag="--thumbnail-cache-mb", minimum=0, group=SEARCH,
        help="MiB of thumbnails kept in memory, least recently used out first (default: 64)")
    cors_allow_origins: tuple[str, ...] = setting(
        (), flag="--cors-allow-origin", group=CONNECTIONS, cli_default=None,
        help="answer browsers from this origin (scheme://host:port) with CORS headers, e.g. clip-retrieval's web "
             "front served elsewhere (repeatable; '*': any origin); by default no CORS headers")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> ServeOptions:
        """The options a parsed command line asks for; a value under its minimum is a UsageError."""
        check_minimums(args)
        values = {f.name: getattr(args, _dest(f)) for f in flag_fields(cls)}
        values["model_name"] = args.served_model_name or served_name(args.model)
        if args.api_key is not None and not args.api_key.strip():
            # An unset shell variable (--api-key "$KEY") must not quietly turn authentication off.
            raise UsageError(f"--api-key is empty (an unset shell variable?): give a key, or set {API_KEY_ENV}")
        values["api_key"] = args.api_key or environment.get(API_KEY_ENV) or None
        values["allow_hosts"] = tuple(values["allow_hosts"] or ())
        values["cors_allow_origins"] = parse_origins(values["cors_allow_origins"] or ())
        values["collections"] = parse_collections(values["collections"] or ())
        values["faiss"] = parse_faiss(values["faiss"] or ())
        return cls(**{**values, **overrides})


def parse_collections(values) -> tuple[tuple[str, str], ...]:
    """``--collection NAME=DIR`` values as ``(name, dir)`` pairs; a value without ``=``, an empty name, a
    repeated name or a DIR that is no directory is a UsageError (whether DIR holds a collection is checked
    when it is opened)."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        name = name.strip()
        if not sep or not name or not directory:
            raise UsageError(f"--collection takes NAME=DIR, got {value!r}")
        if name in pairs:
            raise UsageError(f"--collection {name!r} is given twice")
        if not Path(directory).expanduser().is_dir():
            raise UsageError(f"--collection {name}={directory}: no such directory")
        pairs[name] = directory
    return tuple(pairs.items())


def parse_origins(values) -> tuple[str, ...]:
    """``--cors-allow-origin`` values: ``*`` or ``scheme://host[:port]``. Browsers send ``Origin`` without a
    path or a final slash and it is compared as text, so ``http://host:3005/`` would match nothing: a
    UsageError rather than a server that silently never answers the front."""
    for value in values:
        if value != "*" and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s]+", value):
            raise UsageError(f"--cors-allow-origin takes * or scheme://host[:port] (as a browser sends Origin), "
                             f"got {value!r}")
    return tuple(values)


def parse_faiss(values) -> tuple[tuple[str, str | None], ...]:
    """``--faiss NAME[=FOLDER]`` values as ``(name, folder or None)``; an empty name or a repeated one is a
    UsageError (the name and the index files are checked when the collections are opened)."""
    pairs: dict[str, str | None] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        name = name.strip()
        if not name or (sep and not folder):
            raise UsageError(f"--faiss takes NAME or NAME=FOLDER, got {value!r}")
        if name in pairs:
            raise UsageError(f"--faiss {name!r} is given twice")
        pairs[name] = folder or None
    return tuple(pairs.items())


def served_name(model: str) -> str:
    """The id ``/v1/models`` lists for ``--model``: a local directory's own name (its path is nobody's
    business), a hub id as it is (vLLM and TEI do the same)."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


def flag_fields(cls) -> list[Field]:
    """The fields of a settings dataclass that have a command-line flag, in declaration order."""
    return [f for f in fields(cls) if f.metadata.get("flag")]


def _dest(f: Field) -> str:
    return f.metadata["dest"] or f.name


def cli_default(f: Field) -> Any:
    """The flag's default: the field's, unless the setting names another."""
    if "cli_default" in f.metadata:
        return f.metadata["cli_default"]
    return f.default_factory() if f.default is MISSING else f.default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags, generated from ``Listen`` and ``ServeOptions`` (a group per ``setting(group=...)``)."""
    groups: dict[str, Any] = {}
    for f in flag_fields(Listen) + flag_fields(ServeOptions):
        meta = f.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        default = cli_default(f)
        kwargs: dict[str, Any] = {"default": default, "help": meta["help"], "dest": _dest(f)}
        if type(default) in (int, float):
            kwargs["type"] = type(default)
        if isinstance(f.default, tuple):  # a repeatable flag: each use adds one value
            kwargs.update(action="append", metavar=meta["flag"].rsplit("-", 1)[-1].upper())
        groups[meta["group"]].add_argument(meta["flag"], **kwargs)


def check_minimums(args: argparse.Namespace) -> None:
    """The first flag under its minimum is the error (those with a minimum of 1 first, then 0)."""
    bounded = [f for f in flag_fields(ServeOptions) if f.metadata["minimum"] is not None]
    for f in sorted(bounded, key=lambda f: -f.metadata["minimum"]):
        minimum, value = f.metadata["minimum"], getattr(args, _dest(f))
        if value < minimum:
            raise UsageError(f"{f.metadata['flag']} must be at least {minimum}, got {value}")
