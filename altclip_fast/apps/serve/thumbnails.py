"""Thumbnails: a served row's own image as a small base64 JPEG, the ``image`` field clip-retrieval's back
adds to a result whose file is on its machine (its web front shows it).

What may be opened is decided here, never by a request:

- only the ``image_path`` of a row of a loaded collection (a path a client sends is never looked at);
- only below the collection's recorded input root (``input_root`` in its plan, written by ``embed
  --out-dir`` since plan version 4). Paths are compared after resolving every link, so a ``../`` path,
  an absolute path elsewhere, or a link that points outside gets no thumbnail. A collection without a
  recorded root (written by an older altclip-fast) gets none at all;
- a webdataset row (``image_path`` ``<tar>/<key>.<ext>``) is read from that regular member of the tar,
  through an index of the tar's members kept per tar (the tar below the root, as above);
- the bytes go through the upload decoder (``images.with_image``: the format allow-list, the pixel and
  shape limits), so a file is never handed to a Pillow plugin the server would refuse from a client.

Any failure (missing file, refused format, corrupt data) means no ``image`` field for that row, never an
error: the rest of the reply is unaffected. Thumbnails are made once per row and kept in an LRU cache
bounded in bytes (base64 characters, plus a fixed cost per entry, "no thumbnail" answers included).
Decoding runs in this module's own threads, never on the event loop or in the search thread.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import tarfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from ..search import read_plan
from .images import ImageRejected, with_image

__all__ = ["ENTRY_COST", "MAX_PER_REPLY", "MAX_SOURCE_BYTES", "Thumbnails", "confined_source", "make_thumbnail"]

MAX_SOURCE_BYTES = 64 * 1024 * 1024  # a larger file or member is not read at all
MAX_PER_REPLY = 200  # rows past this in one reply get no thumbnail (the front's download asks for 10000)
ENTRY_COST = 128  # bytes charged per cache entry besides its text: keys and bookkeeping
_TAR_INDEXES = 16  # member tables kept, one per tar, least recently used out first
_JPEG_QUALITY = 85


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def confined_source(image_path, root: str) -> tuple[str, str | None] | None:
    """Where a row's image may be read: ``(file, None)``, ``(tar, member)``, or None when the path
    resolves (links followed) outside ``root`` (a real path) or names nothing readable there. A relative
    ``image_path`` is taken relative to ``root``."""
    if not isinstance(image_path, str) or not image_path or "\0" in image_path:
        return None
    real = os.path.realpath(os.path.join(root, image_path))
    if _inside(real, root) and os.path.isfile(real):
        return real, None
    # "<tar>/<key>.<ext>": the first ".tar/" whose prefix is a regular file below the root (a key may
    # itself hold slashes, so later ones are tried too).
    start = 0
    while (cut := image_path.find(".tar/", start)) >= 0:
        start = cut + 1
        tar, member = image_path[:cut + 4], image_path[cut + 5:]
        tar_real = os.path.realpath(os.path.join(root, tar))
        if member and _inside(tar_real, root) and os.path.isfile(tar_real):
            return tar_real, member
    return None


def make_thumbnail(raw: bytes, side: int) -> str:
    """``raw`` (an encoded image) as base64 JPEG text at most ``side`` pixels on its longer side; raises
    ``ImageRejected`` for what the upload decoder refuses."""
    from PIL import ImageOps

    def shrink(image):
        image.draft("RGB", (side, side))  # JPEG: decode at a reduced scale, much cheaper than full size
        image = ImageOps.exif_transpose(image)
        image.thumbnail((side, side))
        if image.mode != "RGB":
            image = image.convert("RGB")
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=_JPEG_QUALITY)
        return base64.b64encode(out.getvalue()).decode("ascii")

    return with_image(raw, shrink)


class _TarIndex:
    """Member tables of tars: ``{name: (data offset, size)}`` of regular members, per (tar, size, mtime)."""

    def __init__(self):
        self._tables: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def read(self, tar: str, member: str) -> bytes | None:
        st = os.stat(tar)
        key = (tar, st.st_size, st.st_mtime_ns)
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
        if table is None:
            with tarfile.open(tar, "r:") as tf:  # uncompressed, as webdataset writes them
                table = {m.name: (m.offset_data, m.size) for m in tf if m.isreg()}
            with self._lock:
                self._tables[key] = table
                while len(self._tables) > _TAR_INDEXES:
                    self._tables.popitem(last=False)
        where = table.get(member)
        if where is None or where[1] > MAX_SOURCE_BYTES:
            return None
        with open(tar, "rb") as f:
            f.seek(where[0])
            return f.read(where[1])


def _read_file(path: str) -> bytes | None:
    with open(path, "rb") as f:
        raw = f.read(MAX_SOURCE_BYTES + 1)
    return raw if len(raw) <= MAX_SOURCE_BYTES else None


class Thumbnails:
    """The thumbnails of served rows. ``side``: longest side in pixels (0: no thumbnails);
    ``cache_bytes``: the cache's bound (0: nothing kept)."""

    def __init__(self, side: int, cache_bytes: int, workers: int = 2):
        self.side, self.cache_bytes, self.workers = side, cache_bytes, workers
        self._cache: OrderedDict = OrderedDict()
        self._cached_bytes = 0
        self._roots: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._tars = _TarIndex()
        self._pool: ThreadPoolExecutor | None = None
        self.made = 0  # thumbnails decoded (not served from the cache): what tests count

    def __bool__(self) -> bool:
        return self.side > 0

    def root(self, collection) -> str | None:
        """The collection's recorded input root as a real path, None when it has none (or it is gone)."""
        if collection.name not in self._roots:
            recorded = read_plan(collection.root).get("input_root")
            real = os.path.realpath(recorded) if isinstance(recorded, str) and os.path.isabs(recorded) else None
            self._roots[collection.name] = real if real and os.path.isdir(real) else None
        return self._roots[collection.name]

    def _make(self, root: str, image_path) -> str | None:
        source = confined_source(image_path, root)
        if source is None:
            return None
        try:
            raw = _read_file(source[0]) if source[1] is None else self._tars.read(*source)
            if raw is None:
                return None
            thumb = make_thumbnail(raw, self.side)
        except (OSError, tarfile.TarError, ImageRejected):
            return None
        self.made += 1
        return thumb

    def get(self, collection, row_id: int, image_path) -> str | None:
        """Row ``row_id``'s thumbnail (from the cache, else made and cached), or None."""
        root = self.root(collection)
        if not self or root is None:
            return None
        key = (collection.name, row_id)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        thumb = self._make(root, image_path)
        self._remember(key, thumb)
        return thumb

    def _remember(self, key, thumb: str | None) -> None:
        cost = ENTRY_COST + (len(thumb) if thumb else 0)
        if cost > self.cache_bytes:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = thumb
            self._cached_bytes += cost
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= ENTRY_COST + (len(old) if old else 0)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def add(self, collection, rows: list[tuple[int, dict]]) -> None:
        """``image`` into each ``(row id, metadata dict)`` whose row has a thumbnail, for the first
        ``MAX_PER_REPLY`` rows; the dicts are changed in place."""
        for row_id, meta in rows[:MAX_PER_REPLY]:
            thumb = self.get(collection, row_id, meta.get("image_path"))
            if thumb is not None:
                meta["image"] = thumb

    async def add_off_loop(self, collection, rows: list[tuple[int, dict]]) -> None:
        """``add`` in this module's threads (started on first use); nothing to do without thumbnails."""
        if not self or not rows or self.root(collection) is None:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="altclip-thumbs")
        await asyncio.get_running_loop().run_in_executor(self._pool, self.add, collection, rows)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
