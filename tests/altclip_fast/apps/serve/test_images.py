"""Request images alone: base64 and data URIs, the format allow-list, the size limits, the request's
pixel budget, and every refusal naming its item."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from altclip_fast.apps.serve.images import (
    MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, ImageRejected, decode_header, decode_image, image_bytes,
    read_headers,
)
from altclip_fast.apps.serve.schemas import ApiError
from tests.altclip_fast.apps.serve.helpers import b64, data_uri, huge_png_header, png, truncated_jpeg
from tests.altclip_fast.image_format_samples import ALLOWED, encoded, refused, watch_ghostscript


def size(image):
    return image.size


def test_base64_and_data_uris_decode_to_what_prepare_makes():
    raw = png(40, 32, 1)
    assert image_bytes(b64(raw)) == raw == image_bytes(data_uri(raw)) == image_bytes("  " + b64(raw)[:10] + "\n"
                                                                                      + b64(raw)[10:] + " ")
    assert decode_image(0, data_uri(png(50, 70, 2, "JPEG"), "jpeg"), size) == (50, 70)
    rgb = decode_image(0, b64(raw), lambda image: np.asarray(image.convert("RGB")))
    assert rgb.shape == (32, 40, 3) and rgb.dtype == np.uint8


@pytest.mark.parametrize("width,height,ok", [
    (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE, True), (MIN_IMAGE_SIDE - 1, 40, False),
    (MIN_IMAGE_SIDE * MAX_ASPECT_RATIO, MIN_IMAGE_SIDE, True), (MIN_IMAGE_SIDE * MAX_ASPECT_RATIO + 1, MIN_IMAGE_SIDE, False),
])
def test_the_side_and_aspect_limits_are_inclusive(width, height, ok):
    item = b64(png(width, height))
    if ok:
        assert decode_image(0, item, size) == (width, height)
    else:
        with pytest.raises(ApiError):
            decode_image(0, item, size)


@pytest.mark.parametrize("item,message", [
    ("!!!not base64!!!", "input[3]: not valid base64 ("),
    ("", "input[3]: the image is empty"),
    (b64(b"hello, this is text"), "input[3]: not an image pillow can read"),
    (b64(png(1, 1)), "input[3]: the image is 1x1; both sides must be at least 8 pixels"),
    (b64(huge_png_header()), f"input[3]: the image is 9000x9000, over the limit of {MAX_IMAGE_PIXELS} pixels"),
    (b64(huge_png_header(20000, 20000)), f"input[3]: the image is over the limit of {MAX_IMAGE_PIXELS} pixels ("),
    (b64(truncated_jpeg()), "input[3]: cannot decode the image ("),
    ("https://example.com/cat.jpg", "input[3]: image URLs are not fetched (the server never fetches what a request "
                                    "names); send the image as base64 or a data:image/...;base64, URI"),
    ("file:///etc/passwd", "input[3]: image URLs are not fetched"),
    ("data:image/png,abc", "input[3]: a data URI must look like data:image/<type>;base64,<data>"),
    ("data:text/plain;base64,aGk=", "input[3]: a data URI must look like data:image/<type>;base64,<data>"),
    (b64(png(400, 9)), "input[3]: the image is 400x9, more elongated than 20:1"),
])
def test_every_refusal_is_a_400_naming_the_item(item, message):
    with pytest.raises(ApiError) as caught:
        decode_image(3, item, size)
    error = caught.value
    assert error.message.startswith(message), error.message
    assert (error.status, error.param, error.reason) == (400, "input[3]", "bad_image")


def test_prepare_failing_is_a_decode_error_not_a_crash():
    def broken(image):
        raise OSError("no")

    with pytest.raises(ApiError, match=r"input\[0\]: cannot decode the image \(OSError: no\)"):
        decode_image(0, b64(png()), broken)
    with pytest.raises(ImageRejected):
        image_bytes("ftp://x/y.png")


def test_openai_and_infinity_base64_spellings_are_read():
    raw = png(40, 32, 3)
    plain = b64(raw)
    assert "+" in plain and "/" in plain and plain.endswith("=")  # so each spelling below differs
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    for item in (plain.rstrip("="), urlsafe, urlsafe.rstrip("="), "DATA:IMAGE/PNG;BASE64," + plain,
                 "Data:image/png;base64," + urlsafe.rstrip("="),
                 " data:image/png;base64," + plain[:50] + "\n" + plain[50:]):
        assert image_bytes(item) == raw, item[:30]
    for item, message in [("DATA:text/plain;base64,aGk=", "a data URI must look like"),
                          ("Data:image/png,abc", "a data URI must look like"),
                          ("HTTPS://example.com/cat.jpg", "image URLs are not fetched"),
                          ("FILE:/etc/passwd", "image URLs are not fetched"),
                          (plain[:-3], "not valid base64"), ("abc=de==", "not valid base64")]:
        with pytest.raises(ImageRejected, match=message):
            image_bytes(item)


@pytest.mark.parametrize("name,fmt,mode", ALLOWED)
def test_every_allowed_format_decodes_as_pillow_decodes_it(name, fmt, mode):
    raw = encoded(fmt, 40, 32, seed=4, mode=mode)
    with Image.open(io.BytesIO(raw)) as image:
        expected = np.asarray(image.convert("RGB"))
    assert np.array_equal(decode_image(0, b64(raw), lambda image: np.asarray(image.convert("RGB"))), expected)


@pytest.mark.parametrize("fmt", sorted(refused()))
def test_other_formats_are_a_400_naming_the_format(monkeypatch, fmt):
    used = watch_ghostscript(monkeypatch)
    with pytest.raises(ApiError) as caught:
        decode_image(2, data_uri(refused()[fmt], "jpeg"), size)
    error = caught.value
    assert (error.status, error.param, error.reason) == (400, "input[2]", "bad_image")
    assert error.message == (f"input[2]: {fmt} images are not decoded (accepted formats: JPEG, PNG, WebP, GIF, BMP, "
                             "TIFF, PPM/PGM/PBM)")
    assert used == []  # EPS: neither its plugin nor Ghostscript ran


def test_the_pixel_budget_is_checked_from_the_headers_before_anything_is_decoded():
    # Headers claiming 6000x6000 over a few bytes of data: decoding any of them would fail.
    items = [b64(huge_png_header(6000, 6000))] * 3
    headers = read_headers(items, max_pixels=108_000_000)
    assert [(h.index, h.width, h.height, h.pixels) for h in headers] == [(i, 6000, 6000, 36_000_000) for i in range(3)]
    with pytest.raises(ApiError) as caught:
        read_headers(items, max_pixels=107_999_999)
    error = caught.value
    assert (error.status, error.param, error.reason) == (413, "input", "too_many_pixels")
    assert error.message == ("the request's images hold more than 107999999 pixels (input[0] to input[2] hold "
                             "108000000), over the limit of 107999999 per request (--max-request-pixels)")
    with pytest.raises(ApiError, match=r"^input\[2\]: cannot decode the image"):
        decode_header(headers[2], size)
    with pytest.raises(ApiError, match=r"^input\[1\]: the image is 1x1"):  # a bad item is still a 400 naming it
        read_headers([b64(png()), b64(png(1, 1))], max_pixels=10**9)
