"""The one allow-list of image formats decoded from bytes or files we are handed.

Pillow picks a decoder from a file's first bytes, whatever its name says, and some of its plugins
are not plain raster decoders: EPS hands the file to Ghostscript, others parse rarely used
containers. ``open_image`` opens only ``DECODED_FORMATS`` (``PIL.Image.open(..., formats=...)``: no
other plugin sees the data); any other format is refused with ``FormatRefused``, naming it when
Pillow knows its signature. The serve app, the embedding pipeline and paths given to the image
processor (``classify``, ``search --image``) all open images through here.
"""

from __future__ import annotations

import os
from typing import IO, TYPE_CHECKING, Union

from ..errors import AltCLIPError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ACCEPTED", "DECODED_FORMATS", "FormatRefused", "open_image", "signature_format"]

# Pillow format ids. JPEG includes MPO (multi-picture JPEGs from phones) and JFIF; PPM is PPM/PGM/PBM.
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
ACCEPTED = "JPEG, PNG, WebP, GIF, BMP, TIFF, PPM/PGM/PBM"
_SIGNATURE_BYTES = 16  # what Image.open reads to choose a plugin


class FormatRefused(AltCLIPError):
    """An image in a format Pillow knows but we do not decode (``.format``: Pillow's id for it)."""

    def __init__(self, fmt: str):
        super().__init__(f"{fmt} images are not decoded (accepted formats: {ACCEPTED})")
        self.format = fmt


def open_image(fp: Union[str, os.PathLike, IO[bytes]]) -> Image.Image:
    """``PIL.Image.open`` for ``DECODED_FORMATS`` only (the header is read, nothing decoded).

    Raises ``FormatRefused`` for another format Pillow recognises by its signature,
    ``PIL.UnidentifiedImageError`` for data that is no image it knows, and what ``Image.open``
    raises otherwise (``FileNotFoundError``, ``DecompressionBombError``...)."""
    from PIL import Image  # here, not at import: the CLI's argument parsing imports the serve app

    try:
        return Image.open(fp, formats=DECODED_FORMATS)
    except Image.UnidentifiedImageError:
        fmt = signature_format(fp)
        if fmt is not None:
            raise FormatRefused(fmt) from None
        raise


def signature_format(fp: Union[str, os.PathLike, IO[bytes]]) -> str | None:
    """Which Pillow format the first bytes announce, by the plugins' signature checks alone (no
    plugin opens anything); ``None`` if none does."""
    from PIL import Image

    if isinstance(fp, (str, os.PathLike)):
        with open(fp, "rb") as file:
            prefix = file.read(_SIGNATURE_BYTES)
    else:
        fp.seek(0)
        prefix = fp.read(_SIGNATURE_BYTES)
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if fmt in DECODED_FORMATS or accept is None:  # no signature: could be anything
            continue
        try:
            if accept(prefix):
                return fmt
        except Exception:  # a check that reads past a short prefix
            continue
    return None
