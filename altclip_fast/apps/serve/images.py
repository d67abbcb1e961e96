"""Request images: base64 or ``data:image/...;base64,`` URIs, checked before anything is decoded.

URLs are never fetched: a server that fetches what a request names is a server-side request forgery
hole. Base64 may be padded or not, standard or URL-safe (as OpenAI and Infinity clients send it), and
``data:`` is read in any case. Only the raster formats of ``preprocessing.image_formats`` are opened
(EPS would run Ghostscript). The header is read first and refused past ``MAX_IMAGE_PIXELS`` pixels,
under ``MIN_IMAGE_SIDE`` on a side, or more elongated than ``MAX_ASPECT_RATIO`` (resizing the short
side to 224 would blow up the other). Every refusal is a 400 naming the item (``input[i]: ...``).

A request's images are read in two steps, so that the cost of decoding is known before it is paid:
``read_headers`` (every item's header, and the request's pixel budget: 413 past it), then
``decode_header`` for one image at a time.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...preprocessing.image_formats import ACCEPTED, FormatRefused, open_image
from .schemas import ApiError

__all__ = ["MAX_ASPECT_RATIO", "MAX_IMAGE_PIXELS", "MIN_IMAGE_SIDE", "ImageHeader", "ImageRejected", "decode_header",
           "decode_image", "image_bytes", "read_header", "read_headers", "with_image"]

MAX_IMAGE_PIXELS = 40_000_000
MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 20


class ImageRejected(ValueError):
    """Why an item is not an image the server takes (the message follows ``input[i]: ``)."""


@dataclass(frozen=True)
class ImageHeader:
    """A request item whose header has been read and checked: its bytes and what decoding will cost."""

    index: int
    raw: bytes
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def image_bytes(item: str) -> bytes:
    """The encoded image a base64 string or a ``data:image/<type>;base64,`` URI carries."""
    text = item.strip()
    if text[:5].lower() == "data:":
        header, comma, data = text.partition(",")
        media = header[5:].lower()
        if not comma or not media.endswith(";base64") or not media.startswith("image/"):
            raise ImageRejected("a data URI must look like data:image/<type>;base64,<data>")
    elif "://" in text[:16] or text[:5].lower() == "file:":
        raise ImageRejected("image URLs are not fetched (the server never fetches what a request names); "
                            "send the image as base64 or a data:image/...;base64, URI")
    else:
        data = text
    data = "".join(data.split()).rstrip("=")
    try:  # padding optional; "-_" (URL-safe) read as "+/"
        raw = base64.b64decode(data + "=" * (-len(data) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageRejected(f"not valid base64 ({exc})") from None
    if not raw:
        raise ImageRejected("the image is empty")
    return raw


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageRejected(f"the image is {width}x{height}, over the limit of {MAX_IMAGE_PIXELS} pixels")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageRejected(f"the image is {width}x{height}; both sides must be at least {MIN_IMAGE_SIDE} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageRejected(f"the image is {width}x{height}, more elongated than {MAX_ASPECT_RATIO}:1")


def with_image(raw: bytes, use: Callable):
    """``use(image)`` on the image opened from ``raw`` (its header read, its size checked), with every
    failure of Pillow's an ``ImageRejected``."""
    from PIL import Image

    try:
        with open_image(io.BytesIO(raw)) as image:
            _check_size(*image.size)
            return use(image)
    except ImageRejected:
        raise
    except FormatRefused as exc:
        raise ImageRejected(str(exc)) from None
    except Image.UnidentifiedImageError:
        raise ImageRejected(f"not an image pillow can read (accepted formats: {ACCEPTED})") from None
    except Image.DecompressionBombError as exc:  # pillow's own limit, checked when it opens the header
        raise ImageRejected(f"the image is over the limit of {MAX_IMAGE_PIXELS} pixels ({exc})") from None
    except Exception as exc:  # truncated or corrupt data: pillow raises OSError, ValueError, SyntaxError...
        raise ImageRejected(f"cannot decode the image ({type(exc).__name__}: {str(exc)[:200]})") from None


def _loaded(image):
    image.load()
    return image


def _bad(index: int, exc: ImageRejected) -> ApiError:
    return ApiError(400, f"input[{index}]: {exc}", param=f"input[{index}]", reason="bad_image")


def read_header(index: int, item: str) -> ImageHeader:
    """Request item ``index``'s bytes and checked header (nothing decoded), or a 400 naming it."""
    try:
        raw = image_bytes(item)
        width, height = with_image(raw, lambda image: image.size)
    except ImageRejected as exc:
        raise _bad(index, exc) from None
    return ImageHeader(index, raw, width, height)


def read_headers(items: list[str], max_pixels: int) -> list[ImageHeader]:
    """Every item's header (a 400 naming the first bad one), and the pixels they declare in all
    against the request's budget: a 413 as soon as they pass it, before anything is decoded."""
    headers, total = [], 0
    for index, item in enumerate(items):
        headers.append(read_header(index, item))
        total += headers[-1].pixels
        if total > max_pixels:
            raise ApiError(413, f"the request's images hold more than {max_pixels} pixels (input[0] to input[{index}] "
                           f"hold {total}), over the limit of {max_pixels} per request (--max-request-pixels)",
                           param="input", reason="too_many_pixels")
    return headers


def decode_header(header: ImageHeader, prepare: Callable) -> np.ndarray:
    """A read header's image -> ``prepare(PIL image)`` (the processor's ``uint8 [3, H, W]`` crop), or a
    400 naming the item."""
    try:
        return with_image(header.raw, lambda image: prepare(_loaded(image)))
    except ImageRejected as exc:
        raise _bad(header.index, exc) from None


def decode_image(index: int, item: str, prepare: Callable) -> np.ndarray:
    """Both steps for one item (no budget): ``prepare(PIL image)``, or a 400 naming the item."""
    return decode_header(read_header(index, item), prepare)
