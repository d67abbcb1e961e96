"""Request images alone: base64 and data URIs, the size limits, and every refusal naming its item."""

from __future__ import annotations

import numpy as np
import pytest

from altclip_fast.apps.serve.images import (
    MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, ImageRejected, decode_image, image_bytes,
)
from altclip_fast.apps.serve.schemas import ApiError
from tests.altclip_fast.apps.serve.helpers import b64, data_uri, huge_png_header, png, truncated_jpeg


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
