"""Parts: a batch's embeddings saved until the writer has used them, one format for every engine and
writer, so that ``--resume`` redoes only the inputs no saved part covers.

A part is ``STATE/parts/{k}/{first:012d}-{last:012d}.npz`` (``k``: the shard its inputs belong to;
``first``/``last``: its smallest and largest input index) holding, per input of the batch, ``idx``,
``ok``, ``reason`` (why it could not be embedded, "" when ok), ``meta`` (its metadata row as JSON),
``skip_path`` (how skipped.parquet names it), and ``embedding`` (and ``text_embedding`` with
--with-text) in float32, zeros where not ``ok``.

Parts are written under a temporary name and renamed (a retried Ray batch rewrites its part, so the
temporary name carries the writing process's id). They are not fsynced one by one (that would
throttle fast GPUs): a killed process leaves complete files either way, and a file torn by a power
loss fails its CRC check in ``saved_inputs`` and is computed again.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import files
from .inputs import Listing

EMBEDDING_COLUMNS = ("embedding", "text_embedding")
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def parts_dir(state: Path | str, k: int) -> Path:
    return Path(state) / "parts" / str(k)


def make_part(listing: Listing, idx: list[int], reasons: dict[int, str], embedding: np.ndarray,
              text_embedding: np.ndarray | None = None) -> dict:
    """A batch's part: ``idx`` in listing order, ``reasons`` for those not embedded, ``embedding``
    ``[len(idx), dim]`` (zeros where not embedded)."""
    part = {"idx": np.asarray(idx, np.int64), "ok": np.asarray([i not in reasons for i in idx], dtype=bool),
            "reason": np.asarray([reasons.get(i, "") for i in idx], dtype=str),
            "meta": np.asarray([json.dumps(listing.rows[i], ensure_ascii=False) for i in idx], dtype=str),
            "skip_path": np.asarray([listing.skip_path(i) for i in idx], dtype=str), "embedding": embedding}
    if text_embedding is not None:
        part["text_embedding"] = text_embedding
    return part


def save_part(state: Path | str, k: int, part: dict) -> None:
    """One batch's slice of shard ``k``: a temporary name, then a rename."""
    folder = parts_dir(state, k)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{int(part['idx'].min()):012d}-{int(part['idx'].max()):012d}.npz"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"  # a retried Ray batch may write it from another process
    files.write_file(final, lambda f: np.savez(f, **part), files.RESUME_HINT, tmp=tmp, sync=False)


def saved_inputs(state: Path | str, shards: list[int]) -> set[int]:
    """The inputs of ``shards`` that saved parts cover. Every member is read in full, so a torn file
    fails its CRC here; unreadable parts are removed, so that their inputs are embedded again."""
    covered: set[int] = set()
    for k in shards:
        for path in sorted(parts_dir(state, k).glob("*.npz")):
            try:
                with np.load(path, allow_pickle=False) as part:
                    for name in part.files:
                        part[name]
                    covered.update(int(i) for i in part["idx"])
            except _READ_ERRORS:
                path.unlink(missing_ok=True)
    return covered


def drop_parts(state: Path | str, k: int, inputs: set[int]) -> None:
    """Remove shard ``k``'s parts that hold any of ``inputs`` (they are computed again)."""
    for path in sorted(parts_dir(state, k).glob("*.npz")):
        try:
            with np.load(path, allow_pickle=False) as part:
                hit = not inputs.isdisjoint(int(i) for i in part["idx"])
        except _READ_ERRORS:
            hit = True
        if hit:
            path.unlink(missing_ok=True)


def remove_parts(state: Path | str, k: int | None = None) -> None:
    """Shard ``k``'s parts (all parts when None), once they are written out."""
    shutil.rmtree(Path(state) / "parts" if k is None else parts_dir(state, k), ignore_errors=True)


def _runs(paths: list[Path], shard: range, k: int) -> list[tuple[Path, np.ndarray]]:
    """``(part, rows of it)`` in listing order, every input of ``shard`` exactly once (a part rewritten
    by a retried batch counts once; parts may interleave after a resume)."""
    idx, which, rows = [], [], []
    for n, path in enumerate(paths):
        with np.load(path, allow_pickle=False) as part:
            got = part["idx"]
        idx.append(got)
        which.append(np.full(len(got), n))
        rows.append(np.arange(len(got)))
    idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    which = np.concatenate(which) if which else np.zeros(0, np.int64)
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    _, first = np.unique(idx, return_index=True)  # sorted by input index, duplicates dropped
    if not np.array_equal(idx[first], np.arange(shard.start, shard.stop)):
        missing = sorted(set(shard) - set(idx.tolist()))
        raise RuntimeError(f"shard {k}: the parts miss inputs {missing[:5]}")
    which, rows = which[first], rows[first]
    cuts = np.flatnonzero(np.diff(which)) + 1
    return [(paths[int(w[0])], r) for w, r in zip(np.split(which, cuts), np.split(rows, cuts)) if len(w)]


def read_rows(state: Path | str, k: int, shard: range, names: tuple[str, ...]) -> Iterator[dict]:
    """Shard ``k``'s ``names`` columns in listing order, a slice at a time (one part in memory)."""
    runs = _runs(sorted(parts_dir(state, k).glob("*.npz")), shard, k)
    loaded: tuple[Path | None, dict] = (None, {})
    for path, rows in runs:
        if loaded[0] != path:
            with np.load(path, allow_pickle=False) as part:
                loaded = (path, {name: part[name] for name in names if name in part.files})
        yield {name: column[rows] for name, column in loaded[1].items()}


def read_shard(state: Path | str, k: int, shard: range, names: tuple[str, ...]) -> dict:
    """Shard ``k``'s ``names`` columns in listing order, whole."""
    slices = list(read_rows(state, k, shard, names))
    return {name: np.concatenate([s[name] for s in slices]) for name in slices[0]} if slices else {}
