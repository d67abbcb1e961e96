"""Images in every format the allow-list decodes and in some it refuses, for the tests of
``preprocessing.image_formats``, serve's images and the embedding decoder (a helper module).

- ``encoded(fmt)``: ``photo_like`` saved by Pillow in ``fmt`` (``ALLOWED``: one sample per accepted
  format, PPM/PGM/PBM included).
- ``EPS``: a tiny EPS file (Pillow hands its body to Ghostscript); ``psd()``: a small raw RGB
  Photoshop file Pillow can decode; ``REFUSED``: those and others Pillow reads by signature.
- ``watch_ghostscript(monkeypatch)``: a list that records any use of Pillow's EPS plugin.
"""

from __future__ import annotations

import io
import struct

from tests.altclip_fast.processor_fixtures import photo_like

# (name, Pillow format to save with, mode to convert to first or None)
ALLOWED = [("JPEG", "JPEG", None), ("PNG", "PNG", None), ("WEBP", "WEBP", None), ("GIF", "GIF", None),
           ("BMP", "BMP", None), ("TIFF", "TIFF", None), ("PPM", "PPM", None), ("PGM", "PPM", "L"),
           ("PBM", "PPM", "1")]

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 32\n"
       b"0.5 setgray 0 0 40 32 rectfill\nshowpage\n%%EOF\n")


def encoded(fmt: str, width: int = 40, height: int = 32, seed: int = 0, mode: str | None = None) -> bytes:
    image = photo_like(width, height, seed=seed)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


def psd(width: int = 40, height: int = 32) -> bytes:
    """A Photoshop file: 3 channels of 8 bits, no resources or layers, raw planes."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layers: all empty
    planes = bytes((7 * i) % 256 for i in range(3 * width * height))
    return header + sections + struct.pack(">H", 0) + planes


def refused() -> dict[str, bytes]:
    """Pillow format id -> a file Pillow recognises by its signature but the allow-list refuses."""
    return {"EPS": EPS, "PSD": psd(), "ICO": encoded("ICO", 32, 32), "PCX": encoded("PCX"),
            "SGI": encoded("SGI"), "QOI": encoded("QOI")}


def watch_ghostscript(monkeypatch) -> list[str]:
    """Patch Pillow's EPS plugin so that opening an EPS or running Ghostscript is recorded in the
    returned list (and then done as before)."""
    from PIL import EpsImagePlugin

    used: list[str] = []

    def recording(name, original):
        def wrapper(*args, **kwargs):
            used.append(name)
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open",
                        recording("EpsImageFile._open", EpsImagePlugin.EpsImageFile._open))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load",
                        recording("EpsImageFile.load", EpsImagePlugin.EpsImageFile.load))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", recording("Ghostscript", EpsImagePlugin.Ghostscript))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript",
                        recording("has_ghostscript", EpsImagePlugin.has_ghostscript))
    return used
