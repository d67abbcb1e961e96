"""Requests in, errors out: the JSON body (read under a byte limit), its fields checked one by one, and
``ApiError``, the one way a request fails (status, OpenAI-style message, the field it names).

No web framework here: ``read_json`` needs only an object with ``headers`` and an async ``stream()``
(a Starlette request), and everything else works on plain dicts, so each rule is tested on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .. import zeroshot

__all__ = ["ApiError", "ClassifyRequest", "DRAIN_BYTES", "EmbeddingRequest", "choice", "error_body", "field",
           "parse_body", "read_json", "string_list"]

# Past --max-request-bytes, up to this much more is read and dropped so that the client gets the 413
# rather than a connection reset in the middle of its upload.
DRAIN_BYTES = 64 * 1024 * 1024


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
    return parse_body(b"".join(chunks))


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({str(exc)[:200]})", param="body") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(body).__name__}", param="body")
    field(body, "model", str)
    return body


# ---------------------------------------------------------------------------------------------- fields


def field(body: dict, name: str, kinds, *, required=False, default=None):
    """``body[name]`` if it is one of ``kinds`` (JSON true is no int); ``default`` when absent or null."""
    if name not in body or body[name] is None:
        if required:
            raise ApiError(422, f"{name} is required", param=name)
        return default
    value = body[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(422, f"{name} must be {names}, got {type(value).__name__}", param=name)
    return value


def string_list(body: dict, name: str, limit: int) -> list[str]:
    """A string or a non-empty list of strings, at most ``limit`` of them (else 413)."""
    value = field(body, name, (str, list), required=True)
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

    input: list[str]
    encoding_format: str
    modality: str
    model: str | None

    @classmethod
    def parse(cls, body: dict, *, max_items: int, dim: int) -> EmbeddingRequest:
        items = string_list(body, "input", max_items)
        fmt = choice(body, "encoding_format", ("float", "base64"))
        modality = choice(body, "modality", ("text", "image"))
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
    def parse(cls, body: dict, *, max_items: int) -> ClassifyRequest:
        images = string_list(body, "input", max_items)
        labels = string_list(body, "labels", max_items)
        if any(not label.strip() for label in labels):
            raise ApiError(422, "labels must not be blank", param="labels")
        template = field(body, "template", str)
        try:
            texts = zeroshot.label_texts(labels, template)
        except zeroshot.TemplateError as exc:
            raise ApiError(422, f"template {exc}", param="template") from None
        return cls(images, labels, texts, body.get("model"))
