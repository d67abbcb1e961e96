"""``altclip-fast serve``: an OpenAI-compatible embedding server (Starlette under uvicorn).

Routes: ``POST /v1/embeddings`` (OpenAI's shape plus ``modality``: ``text`` or ``image``),
``POST /v1/classify`` (zero-shot, as the CLI's ``classify``), ``GET /v1/models``, ``GET /health`` (a
real tiny forward pass, cached for a few seconds) and ``GET /metrics`` (Prometheus).

Requests are validated and prepared (tokenized, images decoded) in a thread pool, then their items
go to the dynamic batcher (``serve_batching``), whose forward passes run in the one thread that owns
the model. Every fault stays inside its request: a bad field or image is a 4xx naming it, a full
queue is 429 with ``Retry-After``, and a client that leaves before its batch runs is dropped from it.

Images are base64 or ``data:image/...;base64,`` URIs only. URLs are never fetched: a server that
fetches what a request names is a server-side request forgery hole.

The web stack is the ``[serve]`` extra; without it, ``altclip-fast serve`` says how to install it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .. import environment
from ..errors import UsageError
from . import faults
from .serve_batching import Batcher, BatchFailed, QueueFull

SERVE_MODULES = ("starlette", "uvicorn", "prometheus_client")
INSTALL_HINT = "pip install 'altclip-fast[serve]'"
API_KEY_ENV = "ALTCLIP_FAST_API_KEY"
HEALTH_TTL_S = 5.0
# Images: at most this many pixels before decoding (read from the header), at least this many on the
# short side, and no more elongated than this (resizing the short side to 224 would blow up the other).
MAX_IMAGE_PIXELS = 40_000_000
MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 20
DRAIN_BYTES = 64 * 1024 * 1024


def check_serve_dependencies() -> None:
    missing = []
    for name in SERVE_MODULES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name.replace("_", "-"))
    if missing:
        raise UsageError(f"serve needs {', '.join(missing)}: {INSTALL_HINT}")


@dataclass
class ServeOptions:
    model_name: str = "altclip"
    max_batch_tokens: int = 8192
    max_batch_images: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_request_bytes: int = 32 * 1024 * 1024
    max_request_items: int = 2048
    label_cache_size: int = 4096
    api_key: str | None = None
    health_ttl_s: float = HEALTH_TTL_S
    preprocess_workers: int = 4
    interpolate_pos_encoding: bool = False


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 reason: str = "bad_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.reason, self.headers = reason, headers or {}


# ---------------------------------------------------------------------------------------------- engine


class Engine:
    """The model, the processor and the batch function the batcher calls (in the model thread)."""

    def __init__(self, model, processor, *, device, dtype, options: ServeOptions):
        import torch

        self.model, self.processor, self.device, self.dtype = model, processor, device, dtype
        self.options = options
        self.dim = int(model.config.projection_dim)
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        self._tokenizer_lock = threading.Lock()  # the tokenizers object is reconfigured per call
        self._torch = torch

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids, truncated to what the model embeds, as the CLI truncates."""
        with self._tokenizer_lock:
            return self.processor.tokenizer(texts, padding=False, truncation=True, return_tensors=None)["input_ids"]

    def run_batch(self, kind: str, payloads: list) -> np.ndarray:
        torch = self._torch
        faults.slow_forward()
        with torch.inference_mode():
            if kind == "text":
                pad = self.processor.tokenizer.pad_token_id
                length = max(len(ids) for ids in payloads)
                ids = torch.full((len(payloads), length), pad, dtype=torch.long)
                mask = torch.zeros((len(payloads), length), dtype=torch.long)
                for row, seq in enumerate(payloads):
                    ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[row, : len(seq)] = 1
                # Right padding with a mask: the text tower runs the real tokens packed, no padding.
                out = self.model.get_text_features(ids.to(self.device), mask.to(self.device))
            else:
                pixels = self.processor.image_processor.to_pixel_values(np.stack(payloads))
                pixels = torch.from_numpy(pixels).to(self.device, self.dtype)
                out = self.model.get_image_features(
                    pixels, interpolate_pos_encoding=self.options.interpolate_pos_encoding
                )
            out = out.float()
            out = out / out.norm(dim=-1, keepdim=True)
            rows = out.cpu().numpy()
        if not np.isfinite(rows).all():
            raise BatchFailed("the model produced non-finite embeddings")
        return rows

    def probe(self) -> None:
        """A real tiny forward through both towers; raises if the model does not work."""
        crop = self.processor.image_processor.prepare(np.full((16, 16, 3), 128, dtype=np.uint8))
        self.run_batch("text", self.tokenize(["health check"]))
        self.run_batch("image", [crop])

    def decode_image(self, index: int, item: str) -> np.ndarray:
        """One request item -> a ``uint8 [3, H, W]`` crop, or an ApiError naming the item."""
        from PIL import Image

        def bad(message):
            return ApiError(400, f"input[{index}]: {message}", param=f"input[{index}]", reason="bad_image")

        text = item.strip()
        if text.startswith("data:"):
            header, comma, data = text.partition(",")
            if not comma or not header.endswith(";base64") or not header[5:].startswith("image/"):
                raise bad("a data URI must look like data:image/<type>;base64,<data>")
        elif "://" in text[:16] or text.startswith("file:"):
            raise bad("image URLs are not fetched (the server never fetches what a request names); "
                      "send the image as base64 or a data:image/...;base64, URI")
        else:
            data = text
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad(f"not valid base64 ({exc})") from None
        if not raw:
            raise bad("the image is empty")
        try:
            with Image.open(io.BytesIO(raw)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise bad(f"the image is {width}x{height}, over the limit of {MAX_IMAGE_PIXELS} pixels")
                if min(width, height) < MIN_IMAGE_SIDE:
                    raise bad(f"the image is {width}x{height}; both sides must be at least {MIN_IMAGE_SIDE} pixels")
                if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                    raise bad(f"the image is {width}x{height}, more elongated than {MAX_ASPECT_RATIO}:1")
                image.load()
                return self.processor.image_processor.prepare(image)
        except ApiError:
            raise
        except Image.UnidentifiedImageError:
            raise bad("not an image pillow can read") from None
        except Image.DecompressionBombError as exc:  # pillow's own limit, checked when it opens the header
            raise bad(f"the image is over the limit of {MAX_IMAGE_PIXELS} pixels ({exc})") from None
        except Exception as exc:  # truncated or corrupt data: pillow raises OSError, ValueError, SyntaxError...
            raise bad(f"cannot decode the image ({type(exc).__name__}: {str(exc)[:200]})") from None


# ---------------------------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics, in a registry of their own (several apps may live in one test process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._depth = Gauge("altclip_queue_depth", "Items waiting in the batch queue", ["modality"],
                            registry=self.registry)
        self._items = Histogram("altclip_batch_items", "Items per model batch", ["modality"], registry=self.registry,
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self._tokens = Histogram("altclip_batch_tokens", "Real tokens per text batch", registry=self.registry,
                                 buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768))
        self._wait = Histogram("altclip_queue_wait_seconds", "Time an item waited before its batch ran",
                               ["modality"], registry=self.registry)
        self._infer = Histogram("altclip_inference_seconds", "Forward pass time per batch", ["modality"],
                                registry=self.registry)
        self._failures = Counter("altclip_failures", "Failed or refused requests and items, by reason", ["reason"],
                                 registry=self.registry)
        self._requests = Counter("altclip_requests", "Requests by route and status", ["route", "status"],
                                 registry=self.registry)
        self._label_hits = Counter("altclip_label_cache_hits", "Classification labels served from the cache",
                                   registry=self.registry)
        self._label_misses = Counter("altclip_label_cache_misses", "Classification labels run through the model",
                                     registry=self.registry)
        for kind in ("text", "image"):
            self._depth.labels(kind).set(0)

    def queue_depth(self, kind, depth):
        self._depth.labels(kind).set(depth)

    def batch(self, kind, items, tokens, waits, seconds):
        self._items.labels(kind).observe(items)
        if kind == "text":
            self._tokens.observe(tokens)
        for wait in waits:
            self._wait.labels(kind).observe(wait)
        self._infer.labels(kind).observe(seconds)

    def label_cache(self, hits, misses):
        self._label_hits.inc(hits)
        self._label_misses.inc(misses)

    def failure(self, reason, count=1):
        self._failures.labels(reason).inc(count)

    def request(self, route, status):
        self._requests.labels(route, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------------------------- validation


def _field(body: dict, name: str, kinds, *, required=False, default=None):
    if name not in body or body[name] is None:
        if required:
            raise ApiError(422, f"{name} is required", param=name)
        return default
    value = body[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON true is no int
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(422, f"{name} must be {names}, got {type(value).__name__}", param=name)
    return value


def _string_list(body: dict, name: str, limit: int) -> list[str]:
    value = _field(body, name, (str, list), required=True)
    items = [value] if isinstance(value, str) else value
    if not items:
        raise ApiError(422, f"{name} must not be empty", param=name)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ApiError(422, f"{name}[{i}] must be a string, got {type(item).__name__}"
                           + (" (token arrays are not accepted: send text)" if isinstance(item, int) else ""),
                           param=f"{name}[{i}]")
    if len(items) > limit:
        raise ApiError(413, f"{name} has {len(items)} items, over the limit of {limit} per request "
                       "(--max-request-items)", param=name, reason="too_many_items")
    return items


def _choice(body: dict, name: str, choices: tuple[str, ...]) -> str:
    value = _field(body, name, str, default=choices[0])
    if value not in choices:
        raise ApiError(422, f"{name} must be one of {', '.join(choices)}, got {value!r}", param=name)
    return value


# ---------------------------------------------------------------------------------------------- app


def create_app(engine: Engine, options: ServeOptions, *, on_ready=None):
    """The Starlette application. ``on_ready`` runs once the batcher is up (the CLI prints its address)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    metrics = Metrics()
    model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="altclip-model")
    prep_pool = ThreadPoolExecutor(max_workers=max(1, options.preprocess_workers), thread_name_prefix="altclip-prep")
    batcher = Batcher(
        engine.run_batch, model_pool, max_batch_tokens=options.max_batch_tokens,
        max_batch_images=options.max_batch_images, max_wait_ms=options.max_wait_ms, max_queue=options.max_queue,
        metrics=metrics,
    )
    health = {"at": -math.inf, "ok": False, "error": None}
    health_lock = asyncio.Lock()
    # /v1/classify clients send the same labels request after request: their rows, keyed by token ids
    # (the model's whole input), skip the model after the first time. Touched on the event loop only.
    label_rows: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()

    def error_response(exc: ApiError, route: str):
        metrics.failure(exc.reason)
        metrics.request(route, exc.status)
        body = {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.status}}
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    async def read_json(request) -> dict:
        limit = options.max_request_bytes
        declared = request.headers.get("content-length", "")
        too_big = ApiError(413, f"the request body is over the limit of {limit} bytes (--max-request-bytes)",
                           reason="too_large")
        if declared.isdigit() and int(declared) > limit + DRAIN_BYTES:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit + DRAIN_BYTES:
                break
            if size <= limit:
                chunks.append(chunk)
            # Past the limit the rest is read and dropped (up to DRAIN_BYTES), so that the client
            # gets the 413 rather than a connection reset in the middle of its upload.
        if size > limit:
            raise too_big
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ApiError(400, f"the body is not valid JSON ({str(exc)[:200]})", param="body") from None
        if not isinstance(body, dict):
            raise ApiError(422, f"the body must be a JSON object, got {type(body).__name__}", param="body")
        _field(body, "model", str)
        return body

    async def rows_for(request, kind: str, items: list[str]):
        """Prepare the items off the event loop, batch them, and wait for their rows (or the client leaving)."""
        loop = asyncio.get_running_loop()
        if kind == "text":
            payloads = await loop.run_in_executor(prep_pool, engine.tokenize, items)
        else:
            payloads = await loop.run_in_executor(
                prep_pool, lambda: [engine.decode_image(i, item) for i, item in enumerate(items)]
            )
        return payloads, await run_rows(request, kind, payloads)

    async def label_rows_for(request, labels: list[str]):
        """``rows_for`` for classification labels, through the label cache (``--label-cache``)."""
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(prep_pool, engine.tokenize, labels)
        keys = [tuple(t) for t in ids]
        # Taken before waiting for the model: other requests may evict these entries meanwhile.
        found = {k: label_rows[k] for k in keys if k in label_rows}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            found.update(zip(missing, await run_rows(request, "text", [list(k) for k in missing])))
        metrics.label_cache(hits=len(found) - len(missing), misses=len(missing))
        for key in dict.fromkeys(keys):
            label_rows[key] = found[key]
            label_rows.move_to_end(key)
        while len(label_rows) > options.label_cache_size:
            label_rows.popitem(last=False)
        return ids, np.stack([found[k] for k in keys])

    async def run_rows(request, kind: str, payloads: list):
        """Queue prepared items for the model and wait for their rows (or the client leaving)."""
        costs = [len(ids) for ids in payloads] if kind == "text" else [1] * len(payloads)
        if len(payloads) > options.max_queue:
            raise ApiError(413, f"the request has {len(payloads)} items, more than the queue holds "
                           f"({options.max_queue}, --max-queue)", param="input", reason="too_many_items")
        try:
            futures = batcher.submit(kind, payloads, costs)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", kind="rate_limit_error",
                           reason="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
        gathered = asyncio.gather(*futures)
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if gathered not in done:  # the client went away: its items leave the queue unrun
            for future in futures:
                future.cancel()
            gathered.cancel()
            raise ApiError(499, "the client disconnected", reason="client_disconnected_request")
        try:
            rows = gathered.result()
        except BatchFailed as exc:
            raise ApiError(500, f"inference failed: {exc}", kind="server_error", reason="inference_request") from None
        return np.stack(rows)

    def encode(row: np.ndarray, fmt: str):
        if fmt == "base64":
            return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
        return row.tolist()

    async def embeddings(request):
        route = "/v1/embeddings"
        try:
            body = await read_json(request)
            items = _string_list(body, "input", options.max_request_items)
            fmt = _choice(body, "encoding_format", ("float", "base64"))
            modality = _choice(body, "modality", ("text", "image"))
            dimensions = _field(body, "dimensions", int)
            if dimensions is not None and dimensions != engine.dim:
                raise ApiError(422, f"dimensions must be {engine.dim} (this model's size) or left out",
                               param="dimensions")
            payloads, rows = await rows_for(request, modality, items)
        except ApiError as exc:
            return error_response(exc, route)
        tokens = sum(len(p) for p in payloads) if modality == "text" else 0
        data = [{"object": "embedding", "index": i, "embedding": encode(row, fmt)} for i, row in enumerate(rows)]
        metrics.request(route, 200)
        return JSONResponse({"object": "list", "data": data, "model": body.get("model") or options.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def classify(request):
        route = "/v1/classify"
        try:
            body = await read_json(request)
            images = _string_list(body, "input", options.max_request_items)
            labels = _string_list(body, "labels", options.max_request_items)
            if any(not label.strip() for label in labels):
                raise ApiError(422, "labels must not be blank", param="labels")
            template = _field(body, "template", str)
            if template is not None and "{}" not in template:
                raise ApiError(422, f"template must contain {{}} where the label goes, got {template!r}",
                               param="template")
            texts = labels if template is None else [template.replace("{}", label) for label in labels]
            (ids, text_rows), (_, image_rows) = await asyncio.gather(
                label_rows_for(request, texts), rows_for(request, "image", images)
            )
        except ApiError as exc:
            return error_response(exc, route)
        logits = engine.logit_scale * image_rows @ text_rows.T
        logits = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        data = []
        for i, row in enumerate(probs):
            order = np.argsort(-row, kind="stable")
            data.append({"object": "classification", "index": i,
                         "predictions": [{"label": labels[j], "probability": float(row[j])} for j in order]})
        tokens = sum(len(p) for p in ids)
        metrics.request(route, 200)
        return JSONResponse({"object": "list", "data": data, "model": body.get("model") or options.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def models(request):
        metrics.request("/v1/models", 200)
        return JSONResponse({"object": "list", "data": [
            {"id": options.model_name, "object": "model", "created": 0, "owned_by": "altclip-fast"}]})

    async def health_route(request):
        async with health_lock:  # concurrent checks share one probe
            if time.monotonic() - health["at"] >= options.health_ttl_s:
                loop = asyncio.get_running_loop()
                try:
                    await asyncio.wait_for(loop.run_in_executor(model_pool, engine.probe), 60)
                    health.update(ok=True, error=None)
                except Exception as exc:
                    health.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
                    metrics.failure("health")
                health["at"] = time.monotonic()
        status = 200 if health["ok"] else 503
        body = {"status": "ok" if health["ok"] else "unhealthy", "queue": batcher.depth}
        if health["error"]:
            body["error"] = health["error"]
        return JSONResponse(body, status_code=status)

    async def metrics_route(request):
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await batcher.stop()
            model_pool.shutdown(wait=True)
            prep_pool.shutdown(wait=True)

    app = Starlette(routes=[
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health_route, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.batcher, app.state.metrics = batcher, metrics
    return _BearerAuth(app, options.api_key, metrics) if options.api_key else app


async def _wait_disconnect(request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _BearerAuth:
    """``Authorization: Bearer KEY`` on every route but /health. The keys are compared as SHA-256
    digests with ``hmac.compare_digest``: constant time, and no length leaks either."""

    def __init__(self, app, key: str, metrics):
        self.app, self.metrics = app, metrics
        self._digest = hashlib.sha256(key.encode()).digest()
        self.state = getattr(app, "state", None)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") != "/health":
            given = b""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    given = value
            scheme, _, token = given.partition(b" ")
            ok = hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self._digest)
            if scheme.lower() != b"bearer" or not ok:
                self.metrics.failure("unauthorized")
                body = json.dumps({"error": {"message": "missing or wrong API key (Authorization: Bearer KEY)",
                                             "type": "invalid_request_error", "param": None, "code": 401}}).encode()
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    g.add_argument("--api-key", default=None,
                   help=f"require Authorization: Bearer KEY on every route but /health (or set {API_KEY_ENV})")
    g.add_argument("--served-model-name", default=None, help="the model id /v1/models lists (default: --model)")
    g = parser.add_argument_group("batching and limits")
    g.add_argument("--max-batch-tokens", type=int, default=8192, help="real tokens per text batch (default: 8192)")
    g.add_argument("--max-batch-images", type=int, default=32, help="images per batch (default: 32)")
    g.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill (default: 5)")
    g.add_argument("--max-queue", type=int, default=1024, help="queued items before answering 429 (default: 1024)")
    g.add_argument("--max-request-bytes", type=int, default=32 * 1024 * 1024,
                   help="largest request body, else 413 (default: 32 MiB)")
    g.add_argument("--max-request-items", type=int, default=2048, help="inputs per request, else 413 (default: 2048)")
    g.add_argument("--label-cache", type=int, default=4096, dest="label_cache_size",
                   help="classification label rows kept for reuse, least recently used out first; 0 keeps none "
                        "(default: 4096)")
    g.add_argument("--preprocess-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads that tokenize and decode images (default: up to 4)")


def run(args, session_factory) -> int:
    """Load the model, bind, serve until SIGTERM/SIGINT (finishing requests in flight), return 0."""
    check_serve_dependencies()
    for name in ("max_batch_tokens", "max_batch_images", "max_queue", "max_request_bytes", "max_request_items",
                 "preprocess_workers"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_wait_ms < 0:
        raise UsageError(f"--max-wait-ms must be at least 0, got {args.max_wait_ms}")
    if args.label_cache_size < 0:
        raise UsageError(f"--label-cache must be at least 0, got {args.label_cache_size}")
    api_key = args.api_key or environment.get(API_KEY_ENV) or None
    import uvicorn

    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    session = session_factory()
    options = ServeOptions(
        model_name=args.served_model_name or args.model, max_batch_tokens=args.max_batch_tokens,
        max_batch_images=args.max_batch_images, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes, max_request_items=args.max_request_items, api_key=api_key,
        label_cache_size=args.label_cache_size, preprocess_workers=args.preprocess_workers,
        interpolate_pos_encoding=session.interpolate_pos_encoding,
    )
    engine = Engine(session.model, session.processor, device=session.device, dtype=session.dtype, options=options)
    engine.probe()  # warm up, and fail here rather than on the first request
    host, port = sock.getsockname()[:2]

    def ready():
        auth = "API key required" if api_key else "no API key"
        print(f"altclip-fast serve: {session.describe()}, listening on http://{host}:{port} ({auth})",
              file=sys.stderr, flush=True)

    app = create_app(engine, options, on_ready=ready)
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
