"""Request images: base64 or ``data:image/...;base64,`` URIs, checked before anything is decoded.

URLs are never fetched: a server that fetches what a request names is a server-side request forgery
hole. The header is read first and refused past ``MAX_IMAGE_PIXELS`` pixels, under ``MIN_IMAGE_SIDE``
on a side, or more elongated than ``MAX_ASPECT_RATIO`` (resizing the short side to 224 would blow up
the other); only then is the image decoded. Every refusal is a 400 naming the item (``input[i]: ...``).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable

import numpy as np

from .schemas import ApiError

__all__ = ["MAX_ASPECT_RATIO", "MAX_IMAGE_PIXELS", "MIN_IMAGE_SIDE", "ImageRejected", "decode_image", "image_bytes"]

MAX_IMAGE_PIXELS = 40_000_000
MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 20


class ImageRejected(ValueError):
    """Why an item is not an image the server takes (the message follows ``input[i]: ``)."""


def image_bytes(item: str) -> bytes:
    """The encoded image a base64 string or a ``data:image/<type>;base64,`` URI carries."""
    text = item.strip()
    if text.startswith("data:"):
        header, comma, data = text.partition(",")
        if not comma or not header.endswith(";base64") or not header[5:].startswith("image/"):
            raise ImageRejected("a data URI must look like data:image/<type>;base64,<data>")
    elif "://" in text[:16] or text.startswith("file:"):
        raise ImageRejected("image URLs are not fetched (the server never fetches what a request names); "
                            "send the image as base64 or a data:image/...;base64, URI")
    else:
        data = text
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
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


def _open(raw: bytes, prepare: Callable):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as image:
            _check_size(*image.size)
            image.load()
            return prepare(image)
    except ImageRejected:
        raise
    except Image.UnidentifiedImageError:
        raise ImageRejected("not an image pillow can read") from None
    except Image.DecompressionBombError as exc:  # pillow's own limit, checked when it opens the header
        raise ImageRejected(f"the image is over the limit of {MAX_IMAGE_PIXELS} pixels ({exc})") from None
    except Exception as exc:  # truncated or corrupt data: pillow raises OSError, ValueError, SyntaxError...
        raise ImageRejected(f"cannot decode the image ({type(exc).__name__}: {str(exc)[:200]})") from None


def decode_image(index: int, item: str, prepare: Callable) -> np.ndarray:
    """Request item ``index`` -> ``prepare(PIL image)`` (the processor's ``uint8 [3, H, W]`` crop), or a
    400 ``ApiError`` naming the item."""
    try:
        return _open(image_bytes(item), prepare)
    except ImageRejected as exc:
        raise ApiError(400, f"input[{index}]: {exc}", param=f"input[{index}]", reason="bad_image") from None
