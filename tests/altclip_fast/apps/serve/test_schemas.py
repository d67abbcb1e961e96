"""Request parsing alone: the body under its byte limit, each field's rule, both request shapes."""

from __future__ import annotations

import asyncio
import json

import pytest

from altclip_fast.apps.serve.schemas import (
    DRAIN_BYTES, ApiError, ClassifyRequest, EmbeddingRequest, choice, embedding_inputs, error_body, field, parse_body,
    read_json, string_list, text,
)


def refused(call, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)
    return caught.value


class FakeRequest:
    """What read_json uses of a Starlette request: headers and an async chunk stream (which records how
    much was read)."""

    def __init__(self, chunks: list[bytes], declared: int | None = None):
        self.headers = {"content-length": str(declared)} if declared is not None else {}
        self.chunks, self.read = chunks, 0

    async def stream(self):
        for chunk in self.chunks:
            self.read += len(chunk)
            yield chunk


def read(request, limit):
    return asyncio.run(read_json(request, limit))


def test_read_json_joins_the_chunks():
    assert read(FakeRequest([b'{"input": ', b'"a"}']), 100) == {"input": "a"}


def test_a_body_over_the_limit_is_413_after_reading_it():
    body = json.dumps({"input": "a" * 200}).encode()
    request = FakeRequest([body[:100], body[100:]])
    error = refused(read, request, 150)
    assert (error.status, error.reason) == (413, "too_large")
    assert error.message == "the request body is over the limit of 150 bytes (--max-request-bytes)"
    assert request.read == len(body)  # drained, so the client reads the 413 rather than a reset


def test_a_declared_length_far_over_the_limit_is_refused_unread():
    request = FakeRequest([b"{}"], declared=10 + DRAIN_BYTES + 1)
    assert refused(read, request, 10).status == 413 and request.read == 0


def test_draining_stops_past_the_drain_allowance():
    chunk = b" " * (DRAIN_BYTES // 4)
    request = FakeRequest([chunk] * 8)
    assert refused(read, request, 10).status == 413
    assert request.read == 5 * len(chunk)  # the chunk that crossed limit + DRAIN_BYTES was the last read


@pytest.mark.parametrize("raw,status,message", [
    (b'{"input": ["a", }', 400, "the body is not valid JSON ("),
    (b"\xff\xfe", 400, "the body is not valid JSON ("),
    (b'["a"]', 422, "the body must be a JSON object, got list"),
    (b'{"model": 3}', 422, "model must be str, got int"),
])
def test_parse_body(raw, status, message):
    error = refused(parse_body, raw)
    assert error.status == status and error.message.startswith(message) and error.param in ("body", "model")


def test_fields_are_typed_and_json_true_is_no_int():
    assert field({"n": 3}, "n", int) == 3
    assert field({"n": None}, "n", int, default=5) == 5 and field({}, "n", int) is None
    assert refused(field, {"n": True}, "n", int).message == "n must be int, got bool"
    assert refused(field, {"n": "3"}, "n", (int, float)).message == "n must be int or float, got str"
    assert refused(field, {}, "n", int, required=True).message == "n is required"


def test_string_lists():
    assert string_list({"input": "one"}, "input", 1) == ["one"]
    assert string_list({"input": ["a", "b"]}, "input", 2) == ["a", "b"]
    assert refused(string_list, {"input": []}, "input", 5).message == "input must not be empty"
    error = refused(string_list, {"input": ["a", 7]}, "input", 5)
    assert (error.message, error.param) == (
        "input[1] must be a string, got int (texts and token arrays cannot be mixed)", "input[1]")
    assert refused(string_list, {"input": ["a", [1]]}, "input", 5).message == (
        "input[1] must be a string, got list (texts and token arrays cannot be mixed)")
    error = refused(string_list, {"input": ["a"] * 3}, "input", 2)
    assert (error.status, error.reason) == (413, "too_many_items")
    assert error.message == "input has 3 items, over the limit of 2 per request (--max-request-items)"


def test_choices_default_to_the_first():
    assert choice({}, "modality", ("text", "image")) == "text"
    assert refused(choice, {"modality": "audio"}, "modality", ("text", "image")).message == (
        "modality must be one of text, image, got 'audio'")


def test_embedding_requests():
    req = EmbeddingRequest.parse({"input": "x", "modality": "image", "encoding_format": "base64", "dimensions": 8,
                                  "model": "m"}, max_items=4, dim=8)
    assert req == EmbeddingRequest(["x"], "base64", "image", "m")
    error = refused(EmbeddingRequest.parse, {"input": "x", "dimensions": 7}, max_items=4, dim=8)
    assert (error.status, error.param, error.message) == (
        422, "dimensions", "dimensions must be 8 (this model's size) or left out")


def test_classify_requests():
    req = ClassifyRequest.parse({"input": ["i"], "labels": ["cat", "dog"], "template": "a {} photo"}, max_items=4)
    assert req.texts == ["a cat photo", "a dog photo"] and req.labels == ["cat", "dog"] and req.model is None
    assert ClassifyRequest.parse({"input": "i", "labels": "cat"}, max_items=4).texts == ["cat"]
    error = refused(ClassifyRequest.parse, {"input": "i", "labels": ["cat"], "template": "no slot"}, max_items=4)
    assert (error.status, error.param, error.message) == (
        422, "template", "template must contain {} where the label goes, got 'no slot'")
    assert refused(ClassifyRequest.parse, {"input": "i", "labels": ["cat", "\t"]}, max_items=4).message == (
        "labels must not be blank")


def test_the_error_body_is_openais_shape():
    error = ApiError(429, "busy", kind="rate_limit_error", headers={"Retry-After": "1"})
    assert error_body(error) == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": 429}}
    assert error.headers == {"Retry-After": "1"} and error.reason == "bad_request"


def test_containers_are_counted_outside_strings():
    body = b'{"input": ["[[{", "a \\"[[[\\" b", [1, 2]]}'
    assert parse_body(body, max_containers=3)["input"][1] == 'a "[[[" b'
    error = refused(parse_body, b'{"input": [[], [], []]}', max_containers=3)
    assert (error.status, error.reason, error.param) == (413, "too_large", "body")
    assert error.message.startswith("the body holds more than 3 JSON arrays and objects")


def test_lone_surrogates_are_refused_and_pairs_kept():
    assert text("cat \U0001f431", "input") == "cat \U0001f431"
    error = refused(text, "ab\udc00", "labels[2]")
    assert (error.status, error.param) == (400, "labels[2]")
    assert error.message == "labels[2] holds a lone surrogate (U+DC00) at character 2: not valid Unicode text"
    assert refused(field, {"model": "\ud800"}, "model", str).param == "model"
    assert refused(string_list, {"input": ["a", "\ud800"]}, "input", 5).param == "input[1]"


def test_embedding_inputs_take_openais_four_shapes():
    assert embedding_inputs({"input": "a"}, 4, 10) == ["a"]
    assert embedding_inputs({"input": ["a", "b"]}, 4, 10) == ["a", "b"]
    assert embedding_inputs({"input": [1, 2, 9]}, 4, 10) == [[1, 2, 9]]
    assert embedding_inputs({"input": [[1], [2, 3]]}, 4, 10) == [[1], [2, 3]]
    error = refused(embedding_inputs, {"input": [[1]] * 5}, 4, 10)
    assert (error.status, error.reason) == (413, "too_many_items")
    error = refused(embedding_inputs, {"input": [1, 10]}, 4, 10)
    assert (error.status, error.param, error.message) == (
        422, "input[1]", "input[1] is token id 10, outside this model's vocabulary (0 to 9)")
