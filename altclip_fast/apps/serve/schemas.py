"""Requests in, errors out: the JSON body (read under a byte limit), its fields checked one by one, and
``ApiError``, the one way a request fails (status, OpenAI-style message, the field it names).

No web framework here: ``read_json`` needs only an object with ``headers`` and an async ``stream()``
(a Starlette request), and everything else works on plain dicts, so each rule is tested on its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .. import zeroshot

__all__ = ["ApiError", "ClassifyRequest", "DRAIN_BYTES", "EXTRA_CONTAINERS", "EmbeddingRequest", "choice",
           "embedding_inputs", "error_body", "field", "parse_body", "read_body", "read_json", "string_list", "text"]

# Past --max-request-bytes, up to this much more is read and dropped so that the client gets the 413
# rather than a connection reset in the middle of its upload.
DRAIN_BYTES = 64 * 1024 * 1024
# JSON arrays and objects a body may hold beyond one per input item (the body, the input and labels lists,
# a few extra fields): parsing ``[],[],...`` costs far more per byte than anything a real request holds,
# and json.loads holds the GIL throughout, so such a body is refused before it is parsed.
EXTRA_CONTAINERS = 64
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_SURROGATE = re.compile("[\ud800-\udfff]")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 reason: str = "bad_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.reason, self.headers = reason, headers or {}


def error_body(exc: ApiError) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.status}}


# ---------------------------------------------------------------------------------------------- the body


async def read_json(request, limit: int) -> dict:
    """The body as a JSON object, refused (413) past ``limit`` bytes, declared or sent."""
    return parse_body(await read_body(request, limit))


async def read_body(request, limit: int) -> bytes:
    """The raw body, refused (413) past ``limit`` bytes, declared or sent (parse it off the event loop)."""
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
    if size > limit:
        raise too_big
    return b"".join(chunks)


def parse_body(raw: bytes, max_containers: int | None = None) -> dict:
    """The body as a JSON object whose ``model`` is a string; past ``max_containers`` JSON arrays and
    objects (outside strings) it is refused (413) unparsed."""
    if max_containers is not None and raw.count(b"[") + raw.count(b"{") > max_containers:
        outside = _STRINGS.sub(b"", raw)
        if outside.count(b"[") + outside.count(b"{") > max_containers:
            raise ApiError(413, f"the body holds more than {max_containers} JSON arrays and objects, more than "
                           "its items can need (--max-request-items)", param="body", reason="too_large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({str(exc)[:200]})", param="body") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(body).__name__}", param="body")
    field(body, "model", str)
    return body


# ---------------------------------------------------------------------------------------------- fields


def text(value: str, name: str) -> str:
    """``value``, unless it holds a lone surrogate (JSON's ``"\\ud800"``): that is no text, 400."""
    found = _SURROGATE.search(value)
    if found:
        raise ApiError(400, f"{name} holds a lone surrogate (U+{ord(found.group()):04X}) at character "
                       f"{found.start()}: not valid Unicode text", param=name)
    return value


def field(body: dict, name: str, kinds, *, required=False, default=None):
    """``body[name]`` if it is one of ``kinds`` (JSON true is no int); ``default`` when absent or null. A
    string with a lone surrogate is a 400 (see ``text``)."""
    if name not in body or body[name] is None:
        if required:
            raise ApiError(422, f"{name} is required", param=name)
        return default
    value = body[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(422, f"{name} must be {names}, got {type(value).__name__}", param=name)
    return text(value, name) if isinstance(value, str) else value


def string_list(body: dict, name: str, limit: int) -> list[str]:
    """A string or a non-empty list of strings, at most ``limit`` of them (else 413)."""
    value = field(body, name, (str, list), required=True)
    items = [value] if isinstance(value, str) else value
    if not items:
        raise ApiError(422, f"{name} must not be empty", param=name)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ApiError(422, f"{name}[{i}] must be a string, got {type(item).__name__}"
                           + (" (texts and token arrays cannot be mixed)" if isinstance(item, (int, list)) else ""),
                           param=f"{name}[{i}]")
        text(item, f"{name}[{i}]")
    return _at_most(items, name, limit)


def _at_most(items: list, name: str, limit: int) -> list:
    if len(items) > limit:
        raise ApiError(413, f"{name} has {len(items)} items, over the limit of {limit} per request "
                       "(--max-request-items)", param=name, reason="too_many_items")
    return items


def embedding_inputs(body: dict, limit: int, vocab: int) -> list:
    """``input`` as OpenAI takes it: a string, a list of strings, one token array (a list of ints) or a
    list of token arrays. Token ids are the model's own (no ``<s>``/``</s>``), each under ``vocab``."""
    value = field(body, "input", (str, list), required=True)
    if isinstance(value, list) and value and isinstance(value[0], int) and not isinstance(value[0], bool):
        return [_token_array(value, "input", vocab, flat=True)]
    if isinstance(value, list) and value and isinstance(value[0], list):
        for i, item in enumerate(value):
            if not isinstance(item, list):
                raise ApiError(422, f"input[{i}] must be a token array (a list of ints) like input[0], got "
                               f"{type(item).__name__}", param=f"input[{i}]")
        return [_token_array(item, f"input[{i}]", vocab) for i, item in enumerate(_at_most(value, "input", limit))]
    return string_list(body, "input", limit)


def _token_array(ids: list, name: str, vocab: int, flat: bool = False) -> list[int]:
    """``ids`` checked; an error names the array, or the id itself when ``input`` is one flat array."""
    if not ids:
        raise ApiError(422, f"{name} must not be empty", param=name)
    if all(type(t) is int for t in ids) and 0 <= min(ids) and max(ids) < vocab:
        return ids
    for j, t in enumerate(ids):
        param = f"{name}[{j}]" if flat else name
        if type(t) is not int:
            raise ApiError(422, f"{name}[{j}] must be a token id (an int), got {type(t).__name__}", param=param)
        if not 0 <= t < vocab:
            raise ApiError(422, f"{name}[{j}] is token id {t}, outside this model's vocabulary (0 to {vocab - 1})",
                           param=param)
    raise AssertionError("unreachable")


def choice(body: dict, name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``; the first when absent."""
    value = field(body, name, str, default=choices[0])
    if value not in choices:
        raise ApiError(422, f"{name} must be one of {', '.join(choices)}, got {value!r}", param=name)
    return value


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class EmbeddingRequest:
    """``POST /v1/embeddings``: OpenAI's fields plus ``modality``."""

    input: list  # strings, or token arrays (lists of token ids) for text
    encoding_format: str
    modality: str
    model: str | None

    @classmethod
    def parse(cls, body: dict, *, max_items: int, dim: int, vocab: int = 0) -> EmbeddingRequest:
        """``vocab``: the model's vocabulary size, which token ids must be under (0: no token arrays)."""
        items = embedding_inputs(body, max_items, vocab)
        fmt = choice(body, "encoding_format", ("float", "base64"))
        modality = choice(body, "modality", ("text", "image"))
        if modality != "text" and not isinstance(items[0], str):
            raise ApiError(422, "token arrays are text: modality must be text", param="modality")
        dimensions = field(body, "dimensions", int)
        if dimensions is not None and dimensions != dim:
            raise ApiError(422, f"dimensions must be {dim} (this model's size) or left out", param="dimensions")
        return cls(items, fmt, modality, body.get("model"))


@dataclass(frozen=True)
class ClassifyRequest:
    """``POST /v1/classify``: images (``input``), ``labels`` and an optional ``template``."""

    input: list[str]
    labels: list[str]
    texts: list[str]  # the labels in their template: what the text tower embeds
    model: str | None

    @classmethod
    def parse(cls, body: dict, *, max_items: int, max_pairs: int | None = None) -> ClassifyRequest:
        """``max_pairs``: the most images x labels (the answer holds one probability per pair), else 413."""
        images = string_list(body, "input", max_items)
        labels = string_list(body, "labels", max_items)
        if max_pairs is not None and len(images) * len(labels) > max_pairs:
            raise ApiError(413, f"{len(images)} images x {len(labels)} labels is {len(images) * len(labels)} "
                           f"image-label pairs, over the limit of {max_pairs} per request (--max-classify-pairs)",
                           param="labels", reason="too_many_items")
        if any(not label.strip() for label in labels):
            raise ApiError(422, "labels must not be blank", param="labels")
        template = field(body, "template", str)
        try:
            texts = zeroshot.label_texts(labels, template)
        except zeroshot.TemplateError as exc:
            raise ApiError(422, f"template {exc}", param="template") from None
        return cls(images, labels, texts, body.get("model"))
