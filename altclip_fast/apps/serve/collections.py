"""The collections ``--collection NAME=DIR`` serves: each an ``embed --out-dir`` folder opened (memory-
mapped) through ``search.Index``, one per modality present, with clip-retrieval's global row ids (a row's
position over the shards in order, as its faiss index numbers them), and under ``--faiss`` the faiss
indexes that answer its searches instead (``faiss_index``).

Searches run in one thread of their own (``Collections.search``), never on the event loop and never in
the model's thread; no HTTP here.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..search import Index
from .faiss_index import FaissIndex, open_indexes

__all__ = ["Collection", "Collections", "Found", "json_value"]

MODALITIES = ("image", "text")


@dataclass
class Found:
    """One result: its cosine, shard, row in that shard and global row id."""

    score: float
    shard: int
    row: int
    id: int


class Collection:
    """One collection: its indexes by modality and the global row ids of its shards. ``faiss_folder``:
    where its clip-retrieval faiss indexes are (``--faiss``), whose searches they then answer."""

    def __init__(self, name: str, directory: str | Path, faiss_folder: str | Path | None = None):
        self.name, self.root = name, Path(directory).expanduser()
        self.indexes: dict[str, Index] = {}
        for modality in MODALITIES:
            try:
                self.indexes[modality] = Index(self.root, modality, device="cpu")
            except UsageError as exc:
                if "no metadata/ folder" in str(exc):
                    raise UsageError(f"--collection {name}={directory}: not an embed --out-dir collection "
                                     "(no metadata/ folder)") from None
        if not self.indexes:
            raise UsageError(f"--collection {name}={directory}: no img_emb or text_emb shards")
        # Both modalities share the metadata files and their rows; the ids follow the first index's shards.
        first = next(iter(self.indexes.values()))
        self.dim = first.dim
        self.shard_ids = list(first.shard_ids)
        sizes = [len(s) for s in first.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._meta_index = first
        self.faiss: dict[str, FaissIndex] = {}
        if faiss_folder is not None:
            self.faiss = open_indexes(f"--faiss {name}", Path(faiss_folder).expanduser(),
                                      {m: len(i) for m, i in self.indexes.items()}, self.dim)

    def engine(self, modality: str) -> str:
        """What answers this collection's ``modality`` searches by default: "faiss" or "exact"."""
        return "faiss" if modality in self.faiss else "exact"

    def __len__(self) -> int:
        return int(self.starts[-1])

    def global_id(self, shard: int, row: int) -> int:
        return int(self.starts[self.shard_ids.index(shard)] + row)

    def locate(self, gid: int) -> tuple[int, int] | None:
        """``(shard, row)`` of a global row id, or None when there is no such row."""
        if not 0 <= gid < len(self):
            return None
        which = int(np.searchsorted(self.starts, gid, side="right") - 1)
        return self.shard_ids[which], gid - int(self.starts[which])

    def metadata(self, shard: int, row: int) -> dict:
        """The row's metadata columns, as JSON values."""
        return {k: json_value(v) for k, v in self._meta_index.metadata(shard, row).items()}

    def search(self, modality: str, queries: np.ndarray, k: int, engine: str = "exact") -> list[list[Found]]:
        """Each query's best ``k`` rows of the ``modality`` index, best first, by exact search or (``engine``
        "faiss") among its faiss index's candidates, scored alike."""
        if engine == "faiss":
            return self._rescored(modality, queries, self.faiss[modality].candidates(queries, k))
        scores, shards, rows = self.indexes[modality].search(queries, k)
        return [[Found(float(s), int(sh), int(r), self.global_id(int(sh), int(r))) for s, sh, r in zip(*q)]
                for q in zip(scores, shards, rows)]

    def _rescored(self, modality: str, queries: np.ndarray, ids: np.ndarray) -> list[list[Found]]:
        """Each query's candidate ids (-1: none) as results, scored by cosine with the stored rows."""
        out = []
        for query, row_ids in zip(queries, ids):
            where = [(int(g), self.locate(int(g))) for g in row_ids]
            found = [Found(0.0, *at, g) for g, at in where if at is not None]
            scores = self.embeddings(modality, found) @ (query / max(float(np.linalg.norm(query)), 1e-12))
            out.append([Found(float(scores[i]), found[i].shard, found[i].row, found[i].id)
                        for i in np.lexsort(([f.id for f in found], -scores))])  # ties: lower id first
        return out

    def embeddings(self, modality: str, found: list[Found]) -> np.ndarray:
        """The stored rows of ``found`` as float32, L2-normalised."""
        index = self.indexes[modality]
        by_shard = dict(zip(index.shard_ids, index.shards))
        rows = np.stack([np.asarray(by_shard[f.shard][f.row], dtype=np.float32) for f in found]) if found else \
            np.zeros((0, self.dim), np.float32)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def json_value(value):
    """A parquet value as JSON can carry it: non-finite floats as null, bytes and others as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return str(value)


class Collections:
    """The served collections by name, and the one thread their searches run in."""

    def __init__(self, pairs=(), faiss=()):
        """``pairs``: ``(name, dir)``; ``faiss``: ``(name, folder or None for the collection's dir)``."""
        folders = dict(pairs)
        for name, _ in faiss:
            if name not in folders:
                raise UsageError(f"--faiss {name}: no --collection {name}=DIR")
        opted = {name: folder or folders[name] for name, folder in faiss}
        self.by_name = {name: Collection(name, directory, opted.get(name)) for name, directory in pairs}
        self._pool: ThreadPoolExecutor | None = None

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def names(self) -> list[str]:
        return list(self.by_name)

    def get(self, name: str) -> Collection | None:
        return self.by_name.get(name)

    async def run(self, fn, *args):
        """``fn(*args)`` in the search thread (started on first use)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="altclip-search")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
