"""The optional faiss index of a served collection (``--faiss NAME[=FOLDER]``, the ``[index]`` extra).

``clip-retrieval index`` (autofaiss) writes ``image.index`` and ``text.index`` into its index folder,
built from the ``img_emb`` / ``text_emb`` shards in the order its reader lists them: every ``.npy``
path sorted as a string, so ``img_emb_10.npy`` comes before ``img_emb_2.npy``. ``search.Index`` orders
the shards the same way (and ``embed --out-dir`` zero-pads shard numbers, so that order is also the
numeric one), which makes a faiss id the collection's global row id, with no mapping. An index whose
row count or dimension is not the collection's, or whose metric is not the inner product, is refused
at start-up.

faiss only proposes: its ``k`` candidates are scored again as cosines against the collection's own
stored rows, the same score exact search gives, and sorted by it. An approximate index (IVF, PQ, HNSW)
then never reports a compressed code's score, and a flat index answers exactly what exact search does.
Exact search stays the default and the reference; ``ENGINES`` names what answered a search.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import UsageError

__all__ = ["ENGINES", "INDEX_FILES", "FaissIndex", "import_faiss", "open_indexes"]

ENGINES = ("exact", "faiss")
INDEX_FILES = {"image": "image.index", "text": "text.index"}  # clip-retrieval index's names
INSTALL = "pip install 'altclip-fast[index]' (faiss-cpu)"


def import_faiss(label: str):
    """The faiss module, or a UsageError for ``label`` (the flag) saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise UsageError(f"{label}: faiss is not installed: {INSTALL}") from None
    return faiss


class FaissIndex:
    """One ``*.index`` file, memory-mapped read-only, checked against its collection index's rows and
    dimension. ``candidates(queries, k)``: faiss's ids ``[q, k]`` (-1 where it found fewer)."""

    def __init__(self, path: Path, rows: int, dim: int, label: str):
        faiss = import_faiss(label)
        try:
            self.index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"{label}: {path} is not a faiss index faiss can read ({reason})") from None
        self.path, self.kind = path, type(self.index).__name__
        if self.index.d != dim:
            raise UsageError(f"{label}: {path} has {self.index.d} dims, the collection's embeddings {dim}")
        if self.index.ntotal != rows:
            raise UsageError(f"{label}: {path} holds {self.index.ntotal} rows, the collection {rows}: it was "
                             "built from other shards (rebuild it with clip-retrieval index)")
        if self.index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise UsageError(f"{label}: {path} does not rank by inner product (faiss metric "
                             f"{self.index.metric_type}); clip-retrieval index builds inner-product indexes")

    def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return ids


def open_indexes(label: str, folder: Path, rows: dict[str, int], dim: int) -> dict[str, FaissIndex]:
    """The faiss index of each modality in ``rows`` (its collection's row count) that ``folder`` holds;
    a UsageError when it holds none, or one that does not fit."""
    import_faiss(label)
    if not folder.is_dir():
        raise UsageError(f"{label}: {folder}: no such directory")
    found = {m: FaissIndex(folder / INDEX_FILES[m], n, dim, label) for m, n in rows.items()
             if (folder / INDEX_FILES[m]).is_file()}
    if not found:
        names = " or ".join(INDEX_FILES[m] for m in rows)
        raise UsageError(f"{label}: {folder} holds no {names} (clip-retrieval index writes them)")
    return found
