"""The sharded writer (``embed INPUT --out-dir DIR``): clip-retrieval's layout, so its tools read ours::

    DIR/img_emb/img_emb_{k}.npy          images (float16, L2-normalised by default)
    DIR/text_emb/text_emb_{k}.npy        captions (caption files; webdataset ``txt`` with --with-text)
    DIR/metadata/metadata_{k}.parquet    one row per embedding row, same order
    DIR/skipped.parquet                  every input not embedded, with the reason

Shard ``k`` is the inputs ``[k*N, (k+1)*N)`` of the listing (its rows are those of them that could be
embedded); boundaries depend only on the listing and ``--shard-size``, so any engine, and a resumed
run, cut the same shards. Each file is written to a temporary name and renamed, the metadata before
the embeddings (a listed ``.npy`` always has its parquet); a shard's marker
``DIR/.altclip-fast/shard-{k}.json`` (its files' sizes and its skipped inputs) is renamed last, so a
shard with a marker is complete. ``skipped.parquet``, written when every shard is, marks a finished
run. The run's state (``plan``, ``parts``) is ``DIR/.altclip-fast/``.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import AltCLIPError, UsageError
from .. import faults
from . import files
from .inputs import Listing
from .job import EmbedJob, Work
from .parts import EMBEDDING_COLUMNS, read_shard, remove_parts

STATE = ".altclip-fast"
DEFAULT_SHARD_SIZE = 100_000
EMB_DTYPES = {"float16": np.float16, "float32": np.float32}
FILE_MODALITY = {"image": "img", "text": "text"}  # clip-retrieval's names, in file names only
SKIPPED_COLUMNS = ("path", "key", "reason")


@dataclass(frozen=True)
class ShardPaths:
    """Where a run's files go. ``width``: the zero-padded width of shard numbers in this run."""

    root: Path
    width: int

    @property
    def state(self) -> Path:
        return self.root / STATE

    def embeddings(self, modality: str, k: int) -> Path:  # modality: "image" or "text"
        name = FILE_MODALITY[modality]
        return self.root / f"{name}_emb" / f"{name}_emb_{k:0{self.width}d}.npy"

    def metadata(self, k: int) -> Path:
        return self.root / "metadata" / f"metadata_{k:0{self.width}d}.parquet"

    def marker(self, k: int) -> Path:
        return self.state / f"shard-{k:0{self.width}d}.json"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.parquet"


def shard_ranges(count: int, shard_size: int) -> list[range]:
    return [range(s, min(count, s + shard_size)) for s in range(0, count, shard_size)]


def column_types(rows: list[dict]):
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


def _skipped_schema():
    import pyarrow as pa

    return pa.schema([pa.field(n, pa.string()) for n in SKIPPED_COLUMNS])


def write_shard(paths: ShardPaths, k: int, schema, embeddings: dict[str, np.ndarray], rows: list[dict],
                skipped: list[dict]) -> dict:
    """Shard ``k``'s files: its metadata first, then its embeddings, its marker last, so that a reader
    that lists the ``.npy`` files (clip-retrieval's ``index`` does) never finds one without its metadata,
    even after a crash. ``embeddings``: ``{"image": ..., "text": ...}``."""
    for modality, array in embeddings.items():
        if len(array) != len(rows):
            raise AltCLIPError(f"internal error: shard {k} has {len(array)} {modality} rows for {len(rows)} metadata rows")
    written = {}
    meta = paths.metadata(k)
    meta.parent.mkdir(exist_ok=True)
    written[str(meta.relative_to(paths.root))] = files.write_file(meta, _parquet_writer(rows, schema))
    faults.before_shard_embeddings(k)
    for modality, array in embeddings.items():
        path = paths.embeddings(modality, k)
        path.parent.mkdir(exist_ok=True)
        written[str(path.relative_to(paths.root))] = files.write_file(
            path, lambda f, a=array: files.write_npy_array(f, a))
    marker = {"shard": k, "rows": len(rows), "files": written, "skipped": skipped}
    files.write_file(paths.marker(k), lambda f: f.write(json.dumps(marker, ensure_ascii=False).encode("utf-8")))
    return marker


def read_marker(paths: ShardPaths, k: int) -> dict | None:
    """Shard ``k``'s marker if the shard is complete on disk (every file there at its recorded size)."""
    try:
        marker = json.loads(paths.marker(k).read_text(encoding="utf-8"))
        if all((paths.root / name).stat().st_size == size for name, size in marker["files"].items()):
            return marker
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def skipped_line(skip: dict) -> str:
    """How a run reports an input it did not embed (a webdataset sample as ``tar#key``)."""
    return f"altclip-fast: skipped {skip['path']}{'#' + skip['key'] if skip.get('key') else ''}: {skip['reason']}"


def listing_skips(listing: Listing) -> list[dict]:
    """The listing's skipped inputs as skipped.parquet has them (a blank caption as ``file:line``)."""
    return [{"path": s["path"] if "path" in s else f"{listing.spec}:{s['line']}", "key": s.get("key"),
             "reason": s["reason"]} for s in listing.skipped]


@dataclass(frozen=True)
class ShardWriter:
    """The engines' side of this writer: plain values, so that a Ray task can assemble a shard."""

    paths: ShardPaths
    schema: object  # pyarrow.Schema
    emb_dtype: str
    modality: str  # what the parts' ``embedding`` column holds: "image" or "text"

    def part_saved(self, part: dict) -> list[str]:
        return []

    def assemble(self, k: int, shard: range) -> list[dict]:
        """Shard ``k``'s parts -> its files (``write_shard``), in listing order, every input of ``shard``
        exactly once; then its parts go. Returns the shard's skipped inputs."""
        state = self.paths.state
        columns = read_shard(state, k, shard, ("ok", "reason", "meta", "skip_path", *EMBEDDING_COLUMNS))
        ok = columns["ok"]
        metas = [json.loads(m) for m in columns["meta"]]
        modality = {"embedding": self.modality, "text_embedding": "text"}
        embeddings = {modality[name]: columns[name][ok].astype(EMB_DTYPES[self.emb_dtype])
                      for name in EMBEDDING_COLUMNS if name in columns}
        skipped = [{"path": str(p), "key": m.get("key"), "reason": str(r)}
                   for m, p, good, r in zip(metas, columns["skip_path"], ok, columns["reason"]) if not good]
        rows = [m for m, good in zip(metas, ok) if good]
        marker = write_shard(self.paths, k, self.schema, embeddings, rows, skipped)
        remove_parts(state, k)
        return marker["skipped"]

    def skipped_line(self, skip: dict) -> str:
        return skipped_line(skip)

    def interrupted(self, work: Work, shards_written: int, batches_written: int, batches_left: int) -> str:
        saved = len(work.shards) - len(work.pending) + shards_written
        return (f"{saved} of {len(work.shards)} shards are saved, and the finished batches of the next: "
                "rerun the same command with --resume to finish")


def check_out_dir(job: EmbedJob) -> Path:
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
    return root


def start_fresh(job: EmbedJob, paths: ShardPaths) -> None:
    """Refuse a DIR that holds anything unless --overwrite; clear what a fresh run writes."""
    existing = [p for p in paths.root.iterdir() if p.name != STATE and not p.name.startswith(".")]
    saved = (paths.state / "plan.json").is_file()
    if (existing or saved) and not job.overwrite:
        hint = "pass --resume to finish it, or --overwrite" if saved else "pass --overwrite"
        raise UsageError(f"--out-dir {job.out_dir} is not empty: {hint} to start over")
    for name in ("img_emb", "text_emb", "metadata", STATE):
        shutil.rmtree(paths.root / name, ignore_errors=True)
    files.remove(paths.skipped)


def reopen(paths: ShardPaths, k: int) -> None:
    """Shard ``k`` holds inputs that changed since it was written: it is computed and written again."""
    files.remove(paths.marker(k))


def finish(listing: Listing, paths: ShardPaths, work: Work, seconds: float) -> int:
    markers = [read_marker(paths, k) for k in range(len(work.shards))]
    missing = [k for k, m in enumerate(markers) if m is None]
    if missing:
        raise AltCLIPError(f"shards {missing[:5]} were not written; rerun the same command with --resume")
    remove_parts(paths.state)
    skipped = listing_skips(listing) + [s for m in markers for s in m["skipped"]]
    files.write_file(paths.skipped, _parquet_writer(skipped, _skipped_schema()))
    rows = sum(m["rows"] for m in markers)
    reused = work.reused
    computed = sum(len(work.shards[k]) for k in work.pending) - reused
    noun = "images" if listing.modality == "image" else "captions"
    rate = computed / seconds if seconds > 0 else 0.0
    partly = f" from {reused} inputs of saved batches and {computed} new" if reused else ""
    print(f"embedded {rows} {noun} into {len(work.shards)} shards in {paths.root} "
          f"({len(work.shards) - len(work.pending)} shards reused, {len(work.pending)} computed{partly} in "
          f"{seconds:.1f}s, {rate:.1f} {noun}/s); "
          f"skipped {len(skipped)}" + (f" (listed in {paths.skipped})" if skipped else ""))
    return 0 if rows else 1


def report_listing(listing: Listing) -> None:
    for s in listing_skips(listing):
        print(skipped_line(s), file=sys.stderr)
