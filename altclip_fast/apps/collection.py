"""``altclip-fast embed INPUT --out-dir DIR``: a collection -> shards in clip-retrieval's layout.

Layout (what clip-retrieval writes, so its tools read ours)::

    DIR/img_emb/img_emb_{k}.npy          images (float16, L2-normalised by default)
    DIR/text_emb/text_emb_{k}.npy        captions (caption files; webdataset ``txt`` with --with-text)
    DIR/metadata/metadata_{k}.parquet    one row per embedding row, same order
    DIR/skipped.parquet                  every input not embedded, with the reason

How a run is kept safe (the single-file mode's rules, per shard; its pieces are reused from embed.py):

- The inputs are listed and sorted up front; shard ``k`` is the inputs ``[k*N, (k+1)*N)`` of the
  listing (its rows are those of them that could be embedded). Shard boundaries depend only on the
  listing and ``--shard-size``, so any engine, and a resumed run, cut the same shards.
- Each file is written to a temporary name and renamed; a shard's marker
  ``DIR/.altclip-fast/shard-{k}.json`` (its files' sizes and its skipped inputs) is renamed last, so
  a shard with a marker is complete. ``skipped.parquet``, written when every shard is, marks a
  finished run.
- ``DIR/.altclip-fast/plan.json`` records what the run computes (a digest of the listing with each
  file's size and mtime, model, dtypes, normalisation, shard size). ``--resume`` recomputes only the
  shards without a marker, and refuses if the listing or the settings changed. The local engine also
  saves each batch of the shard in progress (``DIR/.altclip-fast/parts/{k}/``), so a resumed run
  redoes only the batches that were not saved.
- One run per DIR at a time (a ``flock``); full disks end the run with one line, resumable.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np

from ..errors import AltCLIPError, UsageError
from . import embed as _embed_mod
from . import faults
from .embed import (
    RESUME_HINT, _Hashing, _npy_header, _remove, _replace, _reserve, _Writing, exclusive_output, find_inputs,
)

PLAN_VERSION = 1
STATE = ".altclip-fast"
DEFAULT_SHARD_SIZE = 100_000
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
EMB_DTYPES = {"float16": np.float16, "float32": np.float32}


# ---------------------------------------------------------------------------------------------- listing


@dataclass
class Listing:
    """Everything a run embeds, in output order. ``items[i]`` is how input ``i`` is read (a path, a
    caption, or ``(tar index, key)``); ``rows[i]`` its metadata columns."""

    kind: str  # "image" or "text"
    source: str  # "files", "captions" or "webdataset"
    items: list
    rows: list[dict]
    identity: list[str]  # what the plan digest covers (names with size and mtime)
    skipped: list[dict] = field(default_factory=list)
    texts: list[str] | None = None  # --with-text: the caption per image, row-aligned
    tars: list[str] = field(default_factory=list)


def _expand_braces(spec: str) -> list[str]:
    from braceexpand import braceexpand  # installed with webdataset

    return list(braceexpand(spec))


def webdataset_tars(spec: str) -> list[str] | None:
    """The tar shards INPUT names (a brace pattern, a glob or a folder of .tar files), or None when
    INPUT is not webdataset."""
    path = Path(spec).expanduser()
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        return tars or None
    if path.is_file():
        return [str(path)] if spec.endswith(".tar") else None
    if not spec.endswith(".tar"):
        return None
    if "{" in spec and ".." in spec:
        try:
            names = _expand_braces(os.path.expanduser(spec))
        except ImportError:
            raise UsageError("webdataset input needs the webdataset package: pip install 'altclip-fast[collection]'") from None
        missing = [n for n in names if not os.path.isfile(n)]
        if missing:
            raise UsageError(f"{spec}: {len(missing)} of its {len(names)} tar files do not exist (e.g. {missing[0]})")
        return names
    names = sorted(glob.glob(os.path.expanduser(spec)))
    if not names:
        raise UsageError(f"{spec}: no tar files match this pattern")
    return names


def _wds_samples(tar: str, errors: list[dict]) -> Iterator[dict]:
    """The samples of one tar, through the webdataset library; a read error (a truncated tar, a
    corrupt header) is recorded in ``errors`` and ends this tar, never the run."""
    try:
        from webdataset.tariterators import group_by_keys, tar_file_iterator
    except ImportError:
        raise UsageError("webdataset input needs the webdataset package: pip install 'altclip-fast[collection]'") from None

    def record(exc: Exception) -> bool:
        message = str(exc).split(" @ <", 1)[0]  # webdataset appends its file object's repr
        errors.append({"path": tar, "key": None, "reason": f"unreadable tar: {type(exc).__name__}: {message}"})
        return False  # stop this tar: after a bad header nothing further can be trusted

    try:
        with open(tar, "rb") as f:
            files = (dict(member, __url__=tar) for member in tar_file_iterator(f, handler=record))
            yield from group_by_keys(files, handler=record)
    except Exception as exc:  # raised while the tar stream advances (outside webdataset's handler)
        record(exc)


def _image_member(sample: dict) -> str | None:
    for ext in WDS_IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def _json_fields(raw: bytes | None) -> dict:
    if not raw:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: (v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v, ensure_ascii=False))
            for k, v in value.items() if k not in ("image_path", "key", "caption")}


def list_webdataset(tars: list[str], with_text: bool) -> Listing:
    listing = Listing("image", "webdataset", [], [], [], texts=[] if with_text else None, tars=tars)
    for t, tar in enumerate(tars):
        st = os.stat(tar)
        listing.identity.append(f"{os.path.realpath(tar)}\t{st.st_size}\t{st.st_mtime_ns}")
        errors: list[dict] = []
        for sample in _wds_samples(tar, errors):
            key = sample.get("__key__")
            ext = _image_member(sample)
            caption = sample["txt"].decode("utf-8", "replace").strip() if "txt" in sample else None
            if ext is None:
                listing.skipped.append({"path": tar, "key": key, "reason": "no image member (jpg, jpeg, png, webp)"})
                continue
            if with_text and caption is None:
                listing.skipped.append({"path": tar, "key": key, "reason": "no txt caption (--with-text)"})
                continue
            row = {"image_path": f"{tar}/{key}.{ext}", "key": key}
            if caption is not None:
                row["caption"] = caption
            row.update(_json_fields(sample.get("json")))
            listing.items.append((t, key))
            listing.rows.append(row)
            if with_text:
                listing.texts.append(caption)
        listing.skipped.extend(errors)
    listing.identity.extend(f"{t}\t{k}" for t, k in listing.items)
    return listing


def list_inputs(spec: str, with_text: bool = False) -> Listing:
    tars = webdataset_tars(spec)
    if tars is not None:
        listing = list_webdataset(tars, with_text)
        if not listing.items:
            raise UsageError(f"{spec}: no sample in these tar files has an image")
        return listing
    if with_text:
        raise UsageError("--with-text needs webdataset input (tar shards whose samples carry a txt caption)")
    inputs = find_inputs(spec)
    if inputs.kind == "image":
        rows = [{"image_path": p, "key": f"{i:09d}"} for i, p in enumerate(inputs.items)]
        identity = [f"{k}\t{s}\t{m}" for k, (s, m) in zip(inputs.keys, inputs.stats)]
        skipped = [{"path": s.get("path"), "key": None, "reason": s["reason"]} for s in inputs.skipped]
        return Listing("image", "files", list(inputs.items), rows, identity, skipped)
    rows = [{"caption": r["text"], "key": f"{r['line']:09d}", "line": r["line"]} for r in inputs.rows]
    skipped = [{"path": f"{spec}:{s['line']}", "key": None, "reason": s["reason"]} for s in inputs.skipped]
    return Listing("text", "captions", list(inputs.items), rows, [json.dumps(r, ensure_ascii=False) for r in rows], skipped)


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Where a run's files go. ``width``: the zero-padded width of shard numbers in this run."""

    root: Path
    width: int

    @property
    def state(self) -> Path:
        return self.root / STATE

    def emb(self, kind: str, k: int) -> Path:  # kind: "img" or "text"
        return self.root / f"{kind}_emb" / f"{kind}_emb_{k:0{self.width}d}.npy"

    def metadata(self, k: int) -> Path:
        return self.root / "metadata" / f"metadata_{k:0{self.width}d}.parquet"

    def marker(self, k: int) -> Path:
        return self.state / f"shard-{k:0{self.width}d}.json"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.parquet"

    @property
    def plan(self) -> Path:
        return self.state / "plan.json"


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _write_bytes(final: Path, write: Callable, then: str = RESUME_HINT) -> int:
    """``write(f)`` into a temporary file, then renamed to ``final``; returns the size."""
    tmp = _temp(final)
    with _Writing(final, tmp, then) as f:
        write(f)
    size = tmp.stat().st_size
    _replace(tmp, final, then)
    return size


def _write_array(f, array: np.ndarray) -> None:
    """``.npy`` with plain writes and the space reserved first (see embed.py: never a memory map)."""
    array = np.ascontiguousarray(array)
    header = _npy_header({"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
                          "shape": array.shape})
    _reserve(f, len(header) + array.nbytes)
    out = _Hashing(f)
    out.write(header)
    out.write(array.tobytes())


def _column_types(rows: list[dict]):
    """One pyarrow schema for every shard of a run (a column absent from a shard is still there)."""
    import pyarrow as pa

    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    fields = []
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            kind = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            kind = pa.string()
        fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
    return pa.schema(fields)


def _parquet_writer(rows: list[dict], schema) -> Callable:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(f):
        table = pa.Table.from_pylist(
            [{k: (str(v) if v is not None and pa.types.is_string(schema.field(k).type) and not isinstance(v, str)
                  else v) for k, v in row.items()} for row in rows], schema=schema)
        pq.write_table(table, f)

    return write


SKIPPED_SCHEMA_FIELDS = (("path", "string"), ("key", "string"), ("reason", "string"))


def _skipped_schema():
    import pyarrow as pa

    return pa.schema([pa.field(n, pa.string()) for n, _ in SKIPPED_SCHEMA_FIELDS])


def write_shard(layout: Layout, k: int, schema, embeddings: dict[str, np.ndarray], rows: list[dict],
                skipped: list[dict]) -> dict:
    """Shard ``k``'s files, its marker last. ``embeddings``: ``{"img": ..., "text": ...}``. Called by
    the local engine and by Ray workers alike, so that the files are the same."""
    files = {}
    for kind, array in embeddings.items():
        if len(array) != len(rows):
            raise AltCLIPError(f"internal error: shard {k} has {len(array)} {kind} rows for {len(rows)} metadata rows")
        path = layout.emb(kind, k)
        path.parent.mkdir(exist_ok=True)
        files[str(path.relative_to(layout.root))] = _write_bytes(path, lambda f, a=array: _write_array(f, a))
    meta = layout.metadata(k)
    meta.parent.mkdir(exist_ok=True)
    files[str(meta.relative_to(layout.root))] = _write_bytes(meta, _parquet_writer(rows, schema))
    marker = {"shard": k, "rows": len(rows), "files": files, "skipped": skipped}
    _write_bytes(layout.marker(k), lambda f: f.write(json.dumps(marker, ensure_ascii=False).encode("utf-8")))
    return marker


def read_marker(layout: Layout, k: int) -> dict | None:
    """Shard ``k``'s marker if the shard is complete on disk (every file there at its recorded size)."""
    try:
        marker = json.loads(layout.marker(k).read_text(encoding="utf-8"))
        if all((layout.root / name).stat().st_size == size for name, size in marker["files"].items()):
            return marker
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# ---------------------------------------------------------------------------------------------- compute


@dataclass(frozen=True)
class CollectionJob:
    input: str
    out_dir: str
    model: str
    batch_size: int
    workers: int | None
    shard_size: int
    normalize: bool
    emb_dtype: str
    with_text: bool
    resume: bool
    overwrite: bool
    progress: bool
    exif_transpose: bool
    fast_decode: bool
    engine: str = "local"
    ray_address: str | None = None
    ray_workers: int = 1
    ray_gpus_per_worker: float | None = None
    ray_cpus_per_worker: float | None = None


def _plan(job: CollectionJob, listing: Listing, session) -> dict:
    digest = hashlib.sha256("\n".join(listing.identity).encode("utf-8", "surrogateescape")).hexdigest()
    return {
        "version": PLAN_VERSION, "kind": listing.kind, "source": listing.source, "count": len(listing.items),
        "inputs_sha256": digest, "model": str(session.model_dir.resolve()),
        "dtype": str(session.dtype).removeprefix("torch."), "normalize": bool(job.normalize),
        "emb_dtype": job.emb_dtype, "with_text": bool(job.with_text), "shard_size": job.shard_size,
        "exif_transpose": job.exif_transpose, "fast_decode": bool(job.fast_decode),
        "image_size": getattr(session, "image_size", None),
    }


def shard_ranges(count: int, shard_size: int) -> list[range]:
    return [range(s, min(count, s + shard_size)) for s in range(0, count, shard_size)]


def _decode_bytes(args):
    """In a worker: image bytes -> uint8 crop, or the reason it failed."""
    ip, data = args
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ip.prepare(image), None
    except Image.UnidentifiedImageError:  # its message names the BytesIO object's address: not repeatable
        return None, "cannot decode (not an image file pillow can read)"
    except Exception as exc:  # one corrupt sample never stops the run
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"cannot decode ({type(exc).__name__}{': ' + text if text else ''})"


def tar_images(tar: str, wanted: dict[str, int]) -> Iterator[tuple[int, bytes]]:
    """``(index, image bytes)`` for one tar's wanted samples (``{key: index}``), in the tar's order.
    Both engines read members here, so that they see the same samples."""
    for sample in _wds_samples(tar, []):
        i = wanted.get(sample.get("__key__"))
        if i is not None:
            yield i, sample[_image_member(sample)]


def _wds_bytes(listing: Listing, wanted: set[int]) -> Iterator[tuple[int, bytes]]:
    """``(index, image bytes)`` for the wanted inputs, in listing order, reading each tar once."""
    by_tar: dict[int, dict[str, int]] = {}
    for i in sorted(wanted):
        t, key = listing.items[i]
        by_tar.setdefault(t, {})[key] = i
    for t, keys in sorted(by_tar.items()):
        yield from tar_images(listing.tars[t], keys)


def skipped_path(listing: Listing, i: int) -> str:
    """How skipped.parquet names input ``i``: a webdataset sample by its tar (its key goes in ``key``,
    as the listing's own skipped rows do), any other input by its path or caption."""
    if listing.source == "webdataset":
        return listing.tars[listing.items[i][0]]
    row = listing.rows[i]
    return row.get("image_path", row.get("caption"))


def image_crops(listing: Listing, batches: list[list[int]], session, workers: int):
    """``(indices, uint8 crops or None, skipped, reasons)`` per batch, in order."""
    if listing.source == "files":
        yield from _embed_mod._image_batches(SimpleNamespace(items=listing.items), batches, session, workers)
        return
    import torch

    ip = session.processor.image_processor
    pool = None
    if workers > 0:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers)
    try:
        stream = _wds_bytes(listing, {i for b in batches for i in b})
        for batch in batches:
            got = [next(stream) for _ in batch]
            jobs = [(ip, data) for _, data in got]
            results = list(pool.map(_decode_bytes, jobs)) if pool else [_decode_bytes(j) for j in jobs]
            ok = [(i, crop) for (i, _), (crop, _) in zip(got, results) if crop is not None]
            bad = [(i, reason) for (i, _), (crop, reason) in zip(got, results) if crop is None]
            crops = torch.from_numpy(np.stack([c for _, c in ok])) if ok else None
            yield [i for i, _ in ok], crops, [i for i, _ in bad], [r for _, r in bad]
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def _text_embeddings(session, texts: list[str], batch_size: int, normalize: bool) -> np.ndarray:
    parts = []
    tokenizer = session.processor.tokenizer
    for start in range(0, len(texts), batch_size):
        parts.append(_embed_mod._embed(session, "text", tokenizer(texts[start:start + batch_size]), normalize))
    dim = session.model.config.projection_dim
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def skipped_line(skip: dict) -> str:
    """How a run reports an input it did not embed (a webdataset sample as ``tar#key``)."""
    return f"altclip-fast: skipped {skip['path']}{'#' + skip['key'] if skip.get('key') else ''}: {skip['reason']}"


# A batch's part of a shard, saved until the shard is written (both engines, one format), so that
# ``--resume`` redoes only the batches that were not saved: ``DIR/.altclip-fast/parts/{k}/{first}-{last}.npz``
# holding, per input of the batch, ``idx``, ``ok``, ``reason``, ``meta`` (its metadata row as JSON),
# ``skip_path`` (how skipped.parquet names it), and ``embedding`` (and ``text_embedding`` with
# --with-text) in float32, zeros where not ``ok``.
PART_EMBEDDINGS = {"embedding": None, "text_embedding": "text"}  # part column -> kind ("img"/"text" for embedding)


def parts_dir(root: Path | str, k: int) -> Path:
    return Path(root) / STATE / "parts" / str(k)


def save_part(root: Path | str, k: int, part: dict) -> None:
    """One batch's slice of shard ``k``: a temporary name, then a rename (a retried batch rewrites it)."""
    folder = parts_dir(root, k)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{int(part['idx'].min()):012d}-{int(part['idx'].max()):012d}.npz"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"  # a retried Ray batch may write it from another process
    with _Writing(final, tmp, RESUME_HINT) as f:
        np.savez(f, **part)
    _replace(tmp, final, RESUME_HINT)


def saved_inputs(root: Path | str, pending: list[int]) -> set[int]:
    """The inputs of the pending shards whose parts an interrupted run saved: those parts are kept and
    assembled with the new ones. Unreadable parts are removed, so that their inputs are embedded again."""
    covered: set[int] = set()
    for k in pending:
        for path in sorted(parts_dir(root, k).glob("*.npz")):
            try:
                with np.load(path) as part:
                    covered.update(int(i) for i in part["idx"])
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                path.unlink(missing_ok=True)
    return covered


def assemble_shard(layout: Layout, k: int, schema, emb_dtype: str, kind: str, shard: range) -> dict:
    """Shard ``k``'s parts -> its files (``write_shard``), in listing order, every input of ``shard``
    exactly once (a part rewritten by a retried batch counts once); returns the shard's marker.
    ``kind``: "img" or "text", what the parts' ``embedding`` column holds."""
    folder = parts_dir(layout.root, k)
    parts = [np.load(p) for p in sorted(folder.glob("*.npz"))]
    idx = np.concatenate([p["idx"] for p in parts]) if parts else np.zeros(0, np.int64)
    _, first = np.unique(idx, return_index=True)  # sorted by input index, duplicates dropped
    if not np.array_equal(idx[first], np.arange(shard.start, shard.stop)):
        missing = sorted(set(shard) - set(idx.tolist()))
        raise RuntimeError(f"shard {k}: the parts miss inputs {missing[:5]}")

    def column(name):
        return np.concatenate([p[name] for p in parts])[first]

    ok, reasons, metas = column("ok"), column("reason"), [json.loads(m) for m in column("meta")]
    embeddings = {PART_EMBEDDINGS[name] or kind: column(name)[ok].astype(EMB_DTYPES[emb_dtype])
                  for name in PART_EMBEDDINGS if name in parts[0]}
    skipped = [{"path": str(p), "key": m.get("key"), "reason": str(r)}
               for m, p, good, r in zip(metas, column("skip_path"), ok, reasons) if not good]
    rows = [m for m, good in zip(metas, ok) if good]
    marker = write_shard(layout, k, schema, embeddings, rows, skipped)
    shutil.rmtree(folder, ignore_errors=True)
    return marker


def embed_batch(listing: Listing, result, session, job) -> dict:
    """One batch's results -> its part (the format above), inputs in listing order."""
    indices, payload, bad, reasons = result
    dim = session.model.config.projection_dim
    emb = _embed_mod._embed(session, listing.kind, payload, job.normalize) if payload is not None else None
    why = dict(zip(bad, reasons))
    idx = sorted([*indices, *bad])
    ok = np.asarray([i not in why for i in idx])
    embedding = np.zeros((len(idx), dim), np.float32)
    if emb is not None:
        embedding[ok] = emb
    part = {"idx": np.asarray(idx, np.int64), "ok": ok, "reason": np.asarray([why.get(i, "") for i in idx], dtype=str),
            "meta": np.asarray([json.dumps(listing.rows[i], ensure_ascii=False) for i in idx], dtype=str),
            "skip_path": np.asarray([skipped_path(listing, i) for i in idx], dtype=str), "embedding": embedding}
    if listing.texts is not None:
        text = np.zeros((len(idx), dim), np.float32)
        text[ok] = _text_embeddings(session, [listing.texts[i] for i in indices], job.batch_size, job.normalize)
        part["text_embedding"] = text
    return part


def _local_compute(job, listing, layout, schema, shards, pending, session, workers) -> int:
    """Compute the pending shards here; returns how many inputs came from batches saved by an
    interrupted run."""
    from tqdm import tqdm

    bs = job.batch_size
    saved = saved_inputs(layout.root, pending)
    todo = {k: [i for i in shards[k] if i not in saved] for k in pending}
    per_shard = {k: [todo[k][s:s + bs] for s in range(0, len(todo[k]), bs)] for k in pending}
    flat = [b for k in pending for b in per_shard[k]]
    if listing.kind == "image":
        source = image_crops(listing, flat, session, workers)
    else:
        tokenizer = session.processor.tokenizer
        source = ((b, tokenizer([listing.items[i] for i in b]), [], []) for b in flat)
    reused = sum(len(shards[k]) - len(todo[k]) for k in pending)
    bar = tqdm(total=len(listing.items), initial=len(listing.items) - sum(len(todo[k]) for k in pending),
               unit=" img" if listing.kind == "image" else " text", disable=not job.progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    shards_written = batches_saved = 0
    try:
        for k in pending:
            for _ in per_shard[k]:
                result = next(source)
                save_part(layout.root, k, embed_batch(listing, result, session, job))
                bar.update(len(result[0]) + len(result[2]))
                batches_saved += 1
                faults.after_batch(batches_saved)
            marker = assemble_shard(layout, k, schema, job.emb_dtype, "img" if listing.kind == "image" else "text",
                                    shards[k])
            for s in marker["skipped"]:
                bar.write(skipped_line(s), file=sys.stderr)
            shards_written += 1
            faults.after_shard(shards_written)
        shutil.rmtree(layout.state / "parts", ignore_errors=True)
    except KeyboardInterrupt:
        raise _embed_mod.Interrupted(
            f"{len(shards) - len(pending) + shards_written} of {len(shards)} shards are saved, and the finished "
            "batches of the next: rerun the same command with --resume to finish") from None
    finally:
        bar.close()
    return reused


# ---------------------------------------------------------------------------------------------- run


def _start(job: CollectionJob, layout: Layout, plan: dict) -> None:
    """Check DIR against the options and the plan on disk; start a fresh run when there is none."""
    old = None
    if layout.plan.is_file():
        try:
            old = json.loads(layout.plan.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
    existing = [p for p in layout.root.iterdir() if p.name not in (STATE,) and not p.name.startswith(".")] \
        if layout.root.is_dir() else []
    if job.resume and old is not None:
        differ = [k for k in plan if old.get(k) != plan[k]]
        if not differ:
            return
        details = ", ".join(f"{k}: {old.get(k)!r} then, {plan[k]!r} now" for k in differ)
        what = "the input listing changed" if {"inputs_sha256", "count"} & set(differ) else "the settings changed"
        if not job.overwrite:
            raise UsageError(f"cannot resume the run in {job.out_dir}: {what} ({details}); rerun with the same "
                             "inputs and options, or pass --overwrite to start over")
        print(f"altclip-fast: the run in {job.out_dir} cannot be resumed ({what}); starting over (--overwrite)",
              file=sys.stderr)
    if (existing or old is not None) and not job.overwrite:
        hint = "pass --resume to finish it, or --overwrite" if old is not None else "pass --overwrite"
        raise UsageError(f"--out-dir {job.out_dir} is not empty: {hint} to start over")
    for name in ("img_emb", "text_emb", "metadata", STATE):
        shutil.rmtree(layout.root / name, ignore_errors=True)
    _remove(layout.skipped)
    layout.state.mkdir(parents=True)
    _write_bytes(layout.plan, lambda f: f.write(json.dumps(plan, indent=1).encode("utf-8")), "run again")


def run(job: CollectionJob, open_session: Callable[[], object]) -> int:
    root = Path(job.out_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out-dir {job.out_dir} is a file")
    if not root.parent.is_dir():
        raise UsageError(f"--out-dir {job.out_dir}: the folder {root.parent} does not exist")
    if job.shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {job.shard_size}")
    if job.emb_dtype not in EMB_DTYPES:
        raise UsageError(f"--emb-dtype must be one of {', '.join(EMB_DTYPES)}, got {job.emb_dtype}")
    if job.ray_workers < 1:
        raise UsageError(f"--ray-workers must be at least 1, got {job.ray_workers}")
    for name in ("ray_gpus_per_worker", "ray_cpus_per_worker"):
        value = getattr(job, name)
        if value is not None and (value < 0 or (name == "ray_cpus_per_worker" and value == 0)):
            raise UsageError(f"--{name.replace('_', '-')} must be {'above' if 'cpus' in name else 'at least'} 0, got {value}")
    root.mkdir(exist_ok=True)
    with exclusive_output(SimpleNamespace(out=root / "skipped.parquet", lock=root / ".altclip-fast.lock")):
        return _locked_run(job, root, open_session)


def _locked_run(job: CollectionJob, root: Path, open_session) -> int:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UsageError("--out-dir writes parquet metadata: pip install 'altclip-fast[collection]'") from None
    workers = _embed_mod.default_workers() if job.workers is None else job.workers
    listing = list_inputs(job.input, job.with_text)
    shards = shard_ranges(len(listing.items), job.shard_size)
    layout = Layout(root, len(str(max(0, len(shards) - 1))))
    session = open_session()
    plan = _plan(job, listing, session)
    _start(job, layout, plan)
    if job.resume and layout.skipped.is_file() and all(read_marker(layout, k) for k in range(len(shards))):
        print(f"{root} is already complete; nothing to resume (pass --overwrite to recompute it)")
        return 0
    for s in listing.skipped:
        print(skipped_line(s), file=sys.stderr)
    schema = _column_types(listing.rows)
    pending = [k for k in range(len(shards)) if read_marker(layout, k) is None]
    started = time.perf_counter()
    reused = 0
    if pending:
        if job.engine != "ray":  # Ray's actors load their own copies; the driver never runs the model
            session.model  # loaded before the clock, so that the rate is the embedding rate
        started = time.perf_counter()
        if job.engine == "ray":
            from . import ray_engine

            ray_engine.compute(job, listing, layout, schema, shards, pending, session)
        else:
            reused = _local_compute(job, listing, layout, schema, shards, pending, session, workers)
    seconds = time.perf_counter() - started
    return _finish(job, listing, layout, shards, pending, seconds, reused)


def _finish(job, listing: Listing, layout: Layout, shards, pending, seconds: float, reused: int = 0) -> int:
    markers = [read_marker(layout, k) for k in range(len(shards))]
    missing = [k for k, m in enumerate(markers) if m is None]
    if missing:
        raise AltCLIPError(f"shards {missing[:5]} were not written; rerun the same command with --resume")
    skipped = list(listing.skipped) + [s for m in markers for s in m["skipped"]]
    _write_bytes(layout.skipped, _parquet_writer(skipped, _skipped_schema()))
    rows = sum(m["rows"] for m in markers)
    computed = sum(len(shards[k]) for k in pending) - reused
    noun = "images" if listing.kind == "image" else "captions"
    rate = computed / seconds if seconds > 0 else 0.0
    partly = f" from {reused} inputs of saved batches and {computed} new" if reused else ""
    print(f"embedded {rows} {noun} into {len(shards)} shards in {layout.root} "
          f"({len(shards) - len(pending)} shards reused, {len(pending)} computed{partly} in {seconds:.1f}s, "
          f"{rate:.1f} {noun}/s); "
          f"skipped {len(skipped)}" + (f" (listed in {layout.skipped})" if skipped else ""))
    return 0 if rows else 1
