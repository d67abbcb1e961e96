"""Decoding: an image (a path, or encoded bytes from a webdataset tar) -> a ``uint8 [3, H, W]`` crop,
or the reason it could not be read. One function, ``decode``, run wherever an engine decodes: in
DataLoader workers (``ImageFiles``), in a process pool, or in Ray tasks (``decode_columns``).

An image that cannot be read is reported with its reason and skipped; it never stops a run. Only the
raster formats of ``preprocessing.image_formats`` are decoded (from bytes here, from files by the image
processor): another format (EPS, PSD...) is skipped with a reason naming it, before its plugin sees it.
"""

from __future__ import annotations

import io

import numpy as np

from ...errors import AltCLIPError
from ...preprocessing.image_formats import FormatRefused, open_image


def decode(image_processor, source: str | bytes) -> tuple[np.ndarray | None, str | None]:
    """``(crop, None)``, or ``(None, reason)``. ``source``: an image file's path, or its bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(image_processor, bytes(source))
    try:
        return image_processor.prepare(source), None
    except AltCLIPError as exc:
        return None, str(exc).removeprefix(f"{source}: ")
    except Exception as exc:  # a decoder bug on one odd file must not end a long run
        return None, f"{type(exc).__name__}: {exc}"


def _decode_bytes(image_processor, data: bytes) -> tuple[np.ndarray | None, str | None]:
    from PIL import Image

    try:
        image = open_image(io.BytesIO(data))
        image.load()
        return image_processor.prepare(image), None
    except Image.UnidentifiedImageError:  # its message names the BytesIO object's address: not repeatable
        return None, "cannot decode (not an image file pillow can read)"
    except FormatRefused as exc:
        return None, str(exc)
    except Exception as exc:  # one corrupt sample never stops the run
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"cannot decode ({type(exc).__name__}{': ' + text if text else ''})"


def decode_job(job: tuple) -> tuple[np.ndarray | None, str | None]:
    """``decode`` for a process pool's ``map``: ``(image_processor, source)``."""
    return decode(*job)


class ImageFiles:
    """Dataset of image paths -> (index, uint8 crop or None, reason); runs in DataLoader workers."""

    def __init__(self, paths: list[str], image_processor):
        self.paths = paths
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return (index, *decode(self.image_processor, self.paths[index]))


def collate_crops(batch):
    """``[(index, crop or None, reason)]`` -> ``(indices, crops [B, 3, H, W] or None, skipped, reasons)``:
    the readable crops stacked into one uint8 array (in the worker), the failures' reasons kept."""
    ok = [(i, crop) for i, crop, _ in batch if crop is not None]
    failed = [(i, reason) for i, crop, reason in batch if crop is None]
    crops = np.stack([crop for _, crop in ok]) if ok else None
    return [i for i, _ in ok], crops, [i for i, _ in failed], [reason for _, reason in failed]


def decode_columns(image_processor, sources) -> dict:
    """A Ray batch's sources (paths or bytes) -> columns ``crop`` (zeros where unreadable), ``ok``, ``reason``."""
    results = [decode(image_processor, s if isinstance(s, (bytes, bytearray)) else str(s)) for s in sources]
    size = (3, image_processor.crop_size["height"], image_processor.crop_size["width"])
    return {"crop": np.stack([c if c is not None else np.zeros(size, np.uint8) for c, _ in results]),
            "ok": np.asarray([c is not None for c, _ in results]),
            "reason": np.asarray([r or "" for _, r in results], dtype=object)}
