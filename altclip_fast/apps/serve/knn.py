"""The search routes, on the collections ``--collection`` serves (``collections``):

- clip-retrieval's back-end API, so its ``ClipClient`` and web front work unchanged: ``GET /indices-list``,
  ``POST /knn-service`` and ``POST /metadata``;
- our own ``POST /v1/search``, in the style of ``/v1/embeddings``.

A query (a text, a base64 image or an embedding) is embedded through the same preparation and dynamic
batcher as ``/v1/embeddings`` (``Rows``), L2-normalised, then searched exactly (cosine) in the search
thread, together with the other queries for the same index that arrive within a few ms
(``search_batching``). Errors are ``ApiError`` and have the server's JSON shape. The handlers reach the app's helpers
(body, errors, the batcher) through the ``Routes`` object they are given, so nothing here imports ``app``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .collections import Collection, Collections, Found
from .faiss_index import ENGINES
from .schemas import ApiError, choice, field
from .search_batching import SearchBatcher
from .thumbnails import Thumbnails

__all__ = ["DEDUPLICATE_COSINE", "DEFAULT_NUM_IMAGES", "ENGINE_HEADER", "MAX_RESULTS", "KnnRequest", "SearchRequest",
           "SearchRoutes", "deduplicate", "embedding_query"]

DEFAULT_NUM_IMAGES = 40  # the front's default
MAX_RESULTS = 10_000  # results per query, and ids per /metadata request
DEFAULT_TOP_K = 10
# Results whose stored embeddings are at least this similar to an earlier result's are dropped by
# "deduplicate" (clip-retrieval's back uses the same inner-product threshold).
DEDUPLICATE_COSINE = 0.94
_DEDUP_BLOCK = 256
# clip-retrieval fields this server accepts, whatever their value, and ignores: its mCLIP text model
# (AltCLIP is multilingual already), its safety and violence classifiers and its aesthetic re-weighting
# (models it does not load). Documentation only: nothing reads them.
ENGINE_HEADER = "X-AltCLIP-Search"  # what answered a search: "exact" or "faiss" (--faiss)
IGNORED = ("use_mclip", "use_safety_model", "use_violence_detector", "aesthetic_score", "aesthetic_weight")


def embedding_query(value, dim: int, name: str) -> np.ndarray:
    """A list of ``dim`` finite numbers as a float32 row, L2-normalised."""
    if not isinstance(value, list) or not value:
        raise ApiError(422, f"{name} must be a non-empty list of numbers", param=name)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise ApiError(422, f"{name} must hold only numbers", param=name)
    if len(value) != dim:
        raise ApiError(422, f"{name} has {len(value)} numbers, the collection's embeddings {dim}", param=name)
    row = np.asarray(value, dtype=np.float32)
    norm = float(np.linalg.norm(row))
    if not np.isfinite(row).all() or not np.isfinite(norm) or norm == 0:
        raise ApiError(422, f"{name} must be finite and not all zero", param=name)
    return row / norm


def _count(body: dict, name: str, default: int, limit: int, clamp: bool = False) -> int:
    value = field(body, name, int, default=default)
    if value < 1:
        raise ApiError(422, f"{name} must be at least 1, got {value}", param=name)
    if value > limit and not clamp:
        raise ApiError(422, f"{name} must be at most {limit}, got {value}", param=name)
    return min(value, limit)


@dataclass(frozen=True)
class KnnRequest:
    """``POST /knn-service``: exactly one of ``text``, ``image`` (base64) or ``embedding_input``."""

    kind: str  # "text", "image" or "embedding": what the query is
    query: object
    modality: str  # which index: "image" or "text"
    indice_name: str
    num_images: int
    num_result_ids: int
    deduplicate: bool

    @classmethod
    def parse(cls, body: dict, default_name: str | None) -> KnnRequest:
        """The query as clip-retrieval's back picks it: a non-empty ``text`` first, then ``image``, then
        ``image_url`` (refused: this server never fetches), then ``embedding_input`` (its front sends the
        fields it does not use as null or "")."""
        if field(body, "text", str):
            kind, query = "text", body["text"]
        elif field(body, "image", str):
            kind, query = "image", body["image"]
        elif body.get("image_url"):
            raise ApiError(400, "image_url is not supported: this server never fetches URLs; send the image "
                           "itself in base64 as image", param="image_url")
        elif body.get("embedding_input") is not None:
            kind, query = "embedding", body["embedding_input"]
        else:
            raise ApiError(422, "give one of text, image or embedding_input", param="text")
        name = field(body, "indice_name", str, default=default_name)
        if name is None:
            raise ApiError(422, "indice_name is required (this server has several collections)", param="indice_name")
        num_images = _count(body, "num_images", DEFAULT_NUM_IMAGES, MAX_RESULTS)
        num_ids = _count(body, "num_result_ids", num_images, MAX_RESULTS, clamp=True)
        return cls(kind, query, choice(body, "modality", ("image", "text")), name, num_images,
                   max(num_ids, num_images), bool(field(body, "deduplicate", bool, default=False)))


@dataclass(frozen=True)
class SearchRequest:
    """``POST /v1/search``: ``input`` (a text, a base64 image or an embedding, as ``modality`` says), the
    ``collection``, its ``index`` to search, ``top_k`` and ``thumbnails`` (off by default: a JSON client
    rarely wants images in its answer); ``search`` ("exact" or "faiss") overrides what answers (by
    default the collection's faiss index under ``--faiss``, else exact search)."""

    kind: str
    query: object
    collection: str
    index: str
    top_k: int
    model: str | None
    thumbnails: bool
    search: str | None = None

    @classmethod
    def parse(cls, body: dict, default_name: str | None) -> SearchRequest:
        kind = choice(body, "modality", ("text", "image", "embedding"))
        query = field(body, "input", list if kind == "embedding" else str, required=True)
        name = field(body, "collection", str, default=default_name)
        if name is None:
            raise ApiError(422, "collection is required (this server has several)", param="collection")
        search = choice(body, "search", ENGINES) if body.get("search") is not None else None
        return cls(kind, query, name, choice(body, "index", ("image", "text")),
                   _count(body, "top_k", DEFAULT_TOP_K, MAX_RESULTS), body.get("model"),
                   bool(field(body, "thumbnails", bool, default=False)), search)


def deduplicate(found: list[Found], rows: np.ndarray, threshold: float | None = None) -> list[Found]:
    """``found`` less its near-duplicates, as clip-retrieval's back removes them: results are linked when
    their rows' cosine is at least ``threshold`` (``DEDUPLICATE_COSINE``), and of each connected group
    (links chain: a, b and c are one group when a~b and b~c) only the best result stays."""
    threshold = DEDUPLICATE_COSINE if threshold is None else threshold
    n = len(found)
    if n < 2:
        return list(found)
    # In blocks of rows, so that memory stays at n*n booleans (10000 results: 100 MB) plus a block.
    blocks = range(0, n, _DEDUP_BLOCK)
    linked = np.concatenate([(rows[b:b + _DEDUP_BLOCK] @ rows.T) >= threshold for b in blocks])
    np.fill_diagonal(linked, True)
    # Each result takes the smallest position in its group: spread the minimum along the links until
    # nothing changes (at most the group's diameter rounds).
    group = np.arange(n)
    while True:
        spread = np.concatenate([np.where(linked[b:b + _DEDUP_BLOCK], group[None, :], n).min(axis=1)
                                 for b in blocks])
        if (spread == group).all():
            break
        group = spread
    return [f for i, f in enumerate(found) if group[i] == i]


class SearchRoutes:
    """The search route handlers. ``routes``: the app's ``Routes`` (``body``, ``error``, ``off_loop``,
    ``rows``, ``metrics``, ``options``)."""

    def __init__(self, routes, collections: Collections):
        self.routes, self.collections = routes, collections
        self.batcher = SearchBatcher(collections.run)
        options = routes.options
        self.thumbnails = Thumbnails(options.thumbnail_size, options.thumbnail_cache_mb * 1024 * 1024)
        for name in collections.names():  # each recorded root read now, at start-up, not on the event loop
            self.thumbnails.root(collections.get(name))

    def close(self) -> None:
        self.thumbnails.close()

    def _default(self) -> str | None:
        names = self.collections.names()
        return names[0] if len(names) == 1 else None

    def collection(self, name: str, modality: str | None, param: str) -> Collection:
        """The collection ``name`` with a ``modality`` index (any when None), else 404 naming it."""
        found = self.collections.get(name)
        if found is None:
            raise ApiError(404, f"the collection {name!r} does not exist: this server has "
                           f"{', '.join(map(repr, self.collections.names()))}", param=param,
                           reason="collection_not_found")
        if modality is not None and modality not in found.indexes:
            raise ApiError(404, f"the collection {name!r} has no {modality} index", param=param,
                           reason="collection_not_found")
        return found

    async def query_row(self, request, kind: str, query, dim: int, param: str) -> tuple[np.ndarray, int]:
        """The query as an L2-normalised row (and its token count), through the batcher unless it is one."""
        if kind == "embedding":
            return embedding_query(query, dim, param), 0
        rows = self.routes.rows
        payloads = await rows.prepare(kind, [query], request)
        row = (await rows.run(request, kind, payloads))[0]
        if row.shape[0] != dim:
            raise ApiError(422, f"the model's embeddings have {row.shape[0]} dims, the collection's {dim}",
                           param=param)
        return row, (len(payloads[0]) if kind == "text" else 0)

    def _json(self, route: str, body, status: int = 200):
        from starlette.responses import JSONResponse

        self.routes.metrics.request(route, status)
        return JSONResponse(body, status_code=status)

    async def indices_list(self, request):
        return self._json("/indices-list", self.collections.names())

    async def knn_service(self, request):
        route = "/knn-service"
        try:
            body = await self.routes.body(request)
            req = KnnRequest.parse(body, self._default())
            coll = self.collection(req.indice_name, req.modality, "indice_name")
            param = {"text": "text", "image": "image", "embedding": "embedding_input"}[req.kind]
            row, _ = await self.query_row(request, req.kind, req.query, coll.dim, param)
            engine = coll.engine(req.modality)
            found = await self.batcher.search(coll, req.modality, row, req.num_result_ids, engine)
            results = await self.collections.run(self._knn, coll, req, found)
            await self.thumbnails.add_off_loop(coll, [(r["id"], r) for r in results])
        except ApiError as exc:
            return self.routes.error(exc, route)
        response = self._json(route, results)  # clip-retrieval's body: what answered goes in a header
        response.headers[ENGINE_HEADER] = engine
        return response

    @staticmethod
    def _knn(coll: Collection, req: KnnRequest, found: list[Found]) -> list[dict]:
        if req.deduplicate:
            found = deduplicate(found, coll.embeddings(req.modality, found))
        return [{"id": f.id, "similarity": f.score, **coll.metadata(f.shard, f.row)} for f in found[:req.num_images]]

    async def metadata(self, request):
        route = "/metadata"
        try:
            body = await self.routes.body(request)
            ids = field(body, "ids", list, required=True)
            if len(ids) > MAX_RESULTS:
                raise ApiError(413, f"ids has {len(ids)} items, over the limit of {MAX_RESULTS}", param="ids",
                               reason="too_many_items")
            if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
                raise ApiError(422, "ids must hold only integers (global row ids)", param="ids")
            name = field(body, "indice_name", str, default=self._default())
            if name is None:
                raise ApiError(422, "indice_name is required (this server has several collections)",
                               param="indice_name")
            coll = self.collection(name, None, "indice_name")
            results = await self.collections.run(self._metadata, coll, ids)
            await self.thumbnails.add_off_loop(coll, [(r["id"], r["metadata"]) for r in results if r["metadata"]])
        except ApiError as exc:
            return self.routes.error(exc, route)
        return self._json(route, results)

    @staticmethod
    def _metadata(coll: Collection, ids: list[int]) -> list[dict]:
        out = []
        for gid in ids:
            where = coll.locate(gid)
            out.append({"id": gid, "metadata": coll.metadata(*where) if where else {}})
        return out

    async def search(self, request):
        route = "/v1/search"
        try:
            body = await self.routes.body(request)
            req = SearchRequest.parse(body, self._default())
            coll = self.collection(req.collection, req.index, "collection")
            engine = req.search or coll.engine(req.index)
            if engine == "faiss" and req.index not in coll.faiss:
                raise ApiError(422, f"the collection {req.collection!r} has no faiss {req.index} index (see "
                               "serve --faiss)", param="search")
            row, tokens = await self.query_row(request, req.kind, req.query, coll.dim, "input")
            found = await self.batcher.search(coll, req.index, row, req.top_k, engine)
            data = await self.collections.run(lambda: [
                {"object": "search_result", "index": i, "score": f.score, "shard": f.shard, "row": f.row,
                 "id": f.id, "metadata": coll.metadata(f.shard, f.row)} for i, f in enumerate(found)])
            if req.thumbnails:
                await self._search_thumbnails(coll, data)
        except ApiError as exc:
            return self.routes.error(exc, route)
        response = self.routes.ok(route, data, req.model, tokens, search=engine)
        response.headers[ENGINE_HEADER] = engine
        return response

    async def _search_thumbnails(self, coll: Collection, data: list[dict]) -> None:
        """``/v1/search``'s opt-in: a result's thumbnail as ``thumbnail`` beside its metadata (not in it,
        where clip-retrieval's back puts its ``image``)."""
        made = [{"image_path": d["metadata"].get("image_path")} for d in data]
        await self.thumbnails.add_off_loop(coll, [(d["id"], m) for d, m in zip(data, made)])
        for d, m in zip(data, made):
            if "image" in m:
                d["thumbnail"] = m["image"]

    def guarded(self, route: str, handler):
        """``handler``, answering an unexpected exception (a bug) as the server's JSON 500."""
        async def run(request):
            try:
                return await handler(request)
            except Exception as exc:
                from starlette.requests import ClientDisconnect

                if isinstance(exc, ClientDisconnect):
                    raise
                logging.getLogger(__name__).exception("%s failed", route)
                return self.routes.error(ApiError(500, "internal server error", kind="server_error",
                                                  reason="internal"), route)
        return run

    def routes_list(self) -> list:
        from starlette.routing import Route

        return [Route(path, self.guarded(path, handler), methods=[method]) for path, handler, method in (
            ("/indices-list", self.indices_list, "GET"), ("/knn-service", self.knn_service, "POST"),
            ("/metadata", self.metadata, "POST"), ("/v1/search", self.search, "POST"))]
