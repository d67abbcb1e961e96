"""The Starlette application: ``create_app(model, options)``.

Routes: ``POST /v1/embeddings`` (OpenAI's shape plus ``modality``: ``text`` or ``image``),
``POST /v1/classify`` (zero-shot, as the CLI's ``classify``), ``GET /v1/models``, ``GET /health`` (a
real tiny forward pass, cached for a few seconds) and ``GET /metrics`` (Prometheus).

Requests are validated and prepared (tokenized, images decoded) in a thread pool, then their items
go to the dynamic batcher (``batching``), whose forward passes run in the one thread that owns the
model (``Rows``). Every fault stays inside its request: a bad field or image is a 4xx naming it, a full
queue is 429 with ``Retry-After``, and a client that leaves before its batch runs is dropped from it.
Starlette is imported when an app is made, never at import.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import zeroshot
from .auth import BearerAuth
from .batching import Batcher, BatchFailed, QueueFull
from .collections import Collections
from .connections import QuietDisconnects
from .health import Health
from .hosts import HostCheck
from .images import decode_header, read_headers
from .knn import ENGINE_HEADER, SearchRoutes
from .label_cache import LabelCache
from .metrics import Metrics
from .model import ServedModel
from .options import ServeOptions
from .schemas import EXTRA_CONTAINERS, ApiError, ClassifyRequest, EmbeddingRequest, error_body, parse_body, read_body

__all__ = ["Rows", "Routes", "counted", "create_app", "encode", "predictions", "wait_disconnect", "with_cors"]


def create_app(model: ServedModel, options: ServeOptions, *, on_ready: Callable[[], None] | None = None,
               collections: Collections | None = None):
    """The ASGI application, behind ``BearerAuth`` when ``options.api_key`` is set, else ``HostCheck``
    (``--allow-host``), then CORS headers when ``--cors-allow-origin`` is given, and ``QuietDisconnects``
    outermost. ``on_ready`` runs
    once the batcher is up (the CLI prints its address there). ``collections``: the opened
    ``options.collections`` (opened here when not given); with any, the search routes (``knn``) answer."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    if collections is None:  # first: fail fast
        collections = Collections(options.collections, options.faiss)
    metrics = Metrics()
    rows = Rows(model, options, metrics)
    routes = Routes(rows, options, metrics)
    search = SearchRoutes(routes, collections) if collections else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await rows.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await rows.stop()
            if search is not None:
                search.close()
            collections.close()

    app = Starlette(routes=[
        Route("/v1/embeddings", routes.embeddings, methods=["POST"]),
        Route("/v1/classify", routes.classify, methods=["POST"]),
        Route("/v1/models", routes.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", routes.model, methods=["GET"]),
        Route("/health", routes.health_route, methods=["GET"]),
        Route("/metrics", routes.metrics_route, methods=["GET"]),
        *(search.routes_list() if search is not None else []),
    ], lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.label_cache = rows.batcher, metrics, rows.labels
    # With a key, the key guards every route; without one, a foreign Host (DNS rebinding) is refused.
    guarded = BearerAuth(app, options.api_key, metrics) if options.api_key else HostCheck(
        app, options.allow_hosts, metrics)
    return QuietDisconnects(with_cors(guarded, options.cors_allow_origins), metrics)


def with_cors(app, origins: tuple[str, ...]):
    """``app`` behind starlette's CORS middleware for ``origins`` (``--cors-allow-origin``), else as it is.
    Outside the key and Host checks: a browser's preflight carries neither the key nor the page's
    credentials, and the 401 or 421 it may get must carry CORS headers for the page to read it. The page
    may read which search answered (``ENGINE_HEADER``): browsers hide other response headers."""
    if not origins:
        return app
    from starlette.middleware.cors import CORSMiddleware

    cors = CORSMiddleware(app, allow_origins=list(origins), allow_methods=["GET", "POST"],
                          allow_headers=["Authorization", "Content-Type"], expose_headers=[ENGINE_HEADER],
                          max_age=600)
    cors.state = getattr(app, "state", None)  # app.state reads the same through it (the server's metrics)
    return cors


# ---------------------------------------------------------------------------------------------- rows


class Rows:
    """Items in, embedding rows out: preparation in a thread pool, the batcher, the model thread, the
    label cache and the health probe, with no HTTP in sight but the request it watches for leaving."""

    def __init__(self, model: ServedModel, options: ServeOptions, metrics):
        self.model, self.options, self.metrics = model, options, metrics
        self.model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="altclip-model")
        self.prep_pool = ThreadPoolExecutor(max_workers=max(1, options.preprocess_workers),
                                            thread_name_prefix="altclip-prep")
        self.batcher = Batcher(
            model.run_batch, self.model_pool, max_batch_tokens=options.max_batch_tokens,
            max_batch_images=options.max_batch_images, max_wait_ms=options.max_wait_ms,
            max_queue=options.max_queue, metrics=metrics,
        )
        self.health = Health(model.probe, self.model_pool, ttl_s=options.health_ttl_s, metrics=metrics)
        self.labels = LabelCache(options.label_cache_size)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.model_pool.shutdown(wait=True)
        self.prep_pool.shutdown(wait=True)

    async def prepare(self, kind: str, items: list[str], request=None) -> list:
        """Token ids or decoded crops, made off the event loop (a bad image is a 400 naming it)."""
        loop = asyncio.get_running_loop()
        if kind == "text":
            return await loop.run_in_executor(self.prep_pool, self.model.tokenize, items)
        return await self.decode_images(request, items)

    async def decode_images(self, request, items: list[str]) -> list[np.ndarray]:
        """A request's crops. Every header is read and the pixels they declare checked against
        ``--max-request-pixels`` (413) before anything is decoded; then the images are decoded one at a
        time, each its own prep-pool task, so a request holds at most one prep thread and each of its
        images queues behind at most one of every other request's; and when the client leaves (499),
        no further image of its is decoded."""
        loop = asyncio.get_running_loop()
        # Headers are cheap (base64 and a few hundred bytes each, no more than parsing the body): read in
        # asyncio's own threads, so a request's first image is queued without waiting for a decode.
        headers = await asyncio.to_thread(read_headers, items, self.options.max_request_pixels)
        left = asyncio.ensure_future(wait_disconnect(request)) if request is not None else None
        crops = []
        try:
            for header in headers:
                crop = loop.run_in_executor(self.prep_pool, decode_header, header, self.model.prepare_image)
                if left is not None:
                    await asyncio.wait({crop, left}, return_when=asyncio.FIRST_COMPLETED)
                    if left.done():
                        crop.cancel()  # not started: never runs; running: finishes, its result dropped
                        crop.add_done_callback(lambda f: f.cancelled() or f.exception())  # nothing unretrieved
                        raise ApiError(499, "the client disconnected", reason="client_disconnected_request")
                crops.append(await crop)
        finally:
            if left is not None:
                left.cancel()
        return crops

    async def for_items(self, request, kind: str, items: list[str]) -> tuple[list, np.ndarray]:
        """Prepare the items, batch them, and wait for their rows (or the client leaving)."""
        payloads = await self.prepare(kind, items, request)
        return payloads, await self.run(request, kind, payloads)

    async def for_labels(self, request, texts: list[str]) -> tuple[list, np.ndarray]:
        """``for_items`` for classification labels, through the label cache (``--label-cache``)."""
        ids = await self.prepare("text", texts)
        keys = [tuple(t) for t in ids]
        found, missing = self.labels.lookup(keys)
        if missing:
            found.update(zip(missing, await self.run(request, "text", [list(k) for k in missing])))
        hits, misses = self.labels.remember(keys, found, len(missing))
        self.metrics.label_cache(hits=hits, misses=misses)
        return ids, np.stack([found[k] for k in keys])

    async def run(self, request, kind: str, payloads: list) -> np.ndarray:
        """Queue prepared items for the model and wait for their rows (or the client leaving)."""
        costs = [len(ids) for ids in payloads] if kind == "text" else [1] * len(payloads)
        if len(payloads) > self.options.max_queue:
            raise ApiError(413, f"the request has {len(payloads)} items, more than the queue holds "
                           f"({self.options.max_queue}, --max-queue)", param="input", reason="too_many_items")
        try:
            futures = self.batcher.submit(kind, payloads, costs)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", kind="rate_limit_error",
                           reason="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
        gathered = asyncio.gather(*futures)
        watcher = asyncio.ensure_future(wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if gathered not in done:  # the client went away: its items leave the queue unrun
            for future in futures:
                future.cancel()
            gathered.cancel()
            # A gather whose item is cancelled ends with CancelledError as its *exception*; unretrieved, asyncio
            # logs "_GatheringFuture exception was never retrieved" for every client that leaves mid-batch.
            gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise ApiError(499, "the client disconnected", reason="client_disconnected_request")
        try:
            rows = gathered.result()
        except BatchFailed as exc:
            raise ApiError(500, f"inference failed: {exc}", kind="server_error", reason="inference_request") from None
        return np.stack(rows)


async def wait_disconnect(request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------------------------------- routes


def encode(row: np.ndarray, fmt: str):
    """One embedding as OpenAI sends it: a list of floats, or base64 of little-endian float32."""
    if fmt == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return row.tolist()


def predictions(labels: list[str], image_rows: np.ndarray, text_rows: np.ndarray, logit_scale: float) -> list:
    """``/v1/classify``'s ``data``: each image's labels, most probable first."""
    probs = zeroshot.probabilities(image_rows, text_rows, logit_scale)
    return [{"object": "classification", "index": i,
             "predictions": [{"label": labels[j], "probability": float(row[j])} for j in zeroshot.ranking(row)]}
            for i, row in enumerate(probs)]


def _json(body: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def counted(route: str):
    """A route handler that answers an unexpected exception (a bug) as a JSON 500, counted under
    ``altclip_requests`` and as failure reason ``internal``, rather than Starlette's plain-text 500."""
    def wrap(handler):
        @functools.wraps(handler)
        async def guarded(self, request):
            try:
                return await handler(self, request)
            except Exception as exc:
                from starlette.requests import ClientDisconnect

                if isinstance(exc, ClientDisconnect):
                    raise  # the client left mid-upload: a normal event, counted by QuietDisconnects
                logging.getLogger(__name__).exception("%s failed", route)
                return self.error(ApiError(500, "internal server error", kind="server_error", reason="internal"),
                                  route)
        return guarded
    return wrap


class Routes:
    """The route handlers. Each API route counts its answer (``altclip_requests``) and each failure
    by reason (``altclip_failures``), an unexpected exception too (a JSON 500, reason ``internal``).
    The body is read on the event loop but parsed and checked in the prep threads, as is a
    classification's answer, whose size ``--max-classify-pairs`` bounds."""

    def __init__(self, rows: Rows, options: ServeOptions, metrics):
        self.rows, self.options, self.metrics = rows, options, metrics

    def error(self, exc: ApiError, route: str):
        self.metrics.failure(exc.reason)
        self.metrics.request(route, exc.status)
        return _json(error_body(exc), exc.status, exc.headers)

    def ok(self, route: str, data: list, model: str | None, tokens: int, **fields):
        """The 200 list reply (``fields``: more top-level fields, after ``model``)."""
        self.metrics.request(route, 200)
        return _json({"object": "list", "data": data, "model": model or self.options.model_name, **fields,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def off_loop(self, fn, *args):
        """Parsing and answer building, in asyncio's own threads: not in the prep pool, where they would
        queue behind other requests' image decodes (each request's images take turns there)."""
        return await asyncio.to_thread(fn, *args)

    async def body(self, request) -> dict:
        """The JSON body, read under ``--max-request-bytes`` and parsed in a prep thread."""
        raw = await read_body(request, self.options.max_request_bytes)
        return await self.off_loop(parse_body, raw, self.options.max_request_items + EXTRA_CONTAINERS)

    @counted("/v1/embeddings")
    async def embeddings(self, request):
        route = "/v1/embeddings"
        try:
            body = await self.body(request)
            req = await self.off_loop(lambda: EmbeddingRequest.parse(
                body, max_items=self.options.max_request_items, dim=self.rows.model.dim,
                vocab=self.rows.model.vocab_size))
            payloads, rows = await self.rows.for_items(request, req.modality, req.input)
        except ApiError as exc:
            return self.error(exc, route)
        tokens = sum(len(p) for p in payloads) if req.modality == "text" else 0
        data = [{"object": "embedding", "index": i, "embedding": encode(row, req.encoding_format)}
                for i, row in enumerate(rows)]
        return self.ok(route, data, req.model, tokens)

    @counted("/v1/classify")
    async def classify(self, request):
        route = "/v1/classify"
        try:
            body = await self.body(request)
            req = await self.off_loop(lambda: ClassifyRequest.parse(
                body, max_items=self.options.max_request_items, max_pairs=self.options.max_classify_pairs))
            (ids, text_rows), (_, image_rows) = await asyncio.gather(
                self.rows.for_labels(request, req.texts), self.rows.for_items(request, "image", req.input)
            )
        except ApiError as exc:
            return self.error(exc, route)
        data = await self.off_loop(predictions, req.labels, image_rows, text_rows, self.rows.model.logit_scale)
        return self.ok(route, data, req.model, sum(len(p) for p in ids))

    async def models(self, request):
        self.metrics.request("/v1/models", 200)
        return _json({"object": "list", "data": [
            {"id": self.options.model_name, "object": "model", "created": 0, "owned_by": "altclip-fast"}]})

    async def model(self, request):
        """``GET /v1/models/{id}`` (the openai client's ``models.retrieve``): the served model, else 404."""
        route, model_id = "/v1/models/{id}", request.path_params["model_id"]
        if model_id != self.options.model_name:
            return self.error(ApiError(404, f"the model {model_id!r} does not exist: this server serves "
                                       f"{self.options.model_name!r}", param="model", reason="model_not_found"), route)
        self.metrics.request(route, 200)
        return _json({"id": self.options.model_name, "object": "model", "created": 0, "owned_by": "altclip-fast"})

    async def health_route(self, request):
        health = self.rows.health
        ok = await health.check()
        body = {"status": "ok" if ok else "unhealthy", "queue": self.rows.batcher.depth}
        if health.error:
            body["error"] = health.error
        return _json(body, 200 if ok else 503)

    async def metrics_route(self, request):
        from starlette.responses import Response

        payload, content_type = self.metrics.render()
        return Response(payload, media_type=content_type)
