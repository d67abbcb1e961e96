"""The single-file writer (``embed INPUT --out x.npy|x.safetensors``), and reading its output back
(``load_embeddings``, ``published_mismatch``).

The run's state is ``.<out>.partial/`` (``plan``: its plan, file stats and parts, the whole listing
being one shard). When every part is saved, the output and then ``<out>.meta.json`` (rows -> inputs,
skipped inputs and why, the output's row count, size and sha256) are written to temporary names,
part by part (the output never has to fit in memory). The old metadata is removed, the output
renamed into place, and the metadata renamed last: a metadata file next to an output always
describes it (``load_embeddings`` checks that), and the partial directory, removed after both,
keeps a run resumable until then.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import AltCLIPError, UsageError
from .. import faults
from . import files
from .inputs import Listing
from .job import EmbedJob, Work
from .parts import read_rows

OUTPUT_SUFFIXES = (".npy", ".safetensors")


@dataclass(frozen=True)
class OutputFiles:
    """The output, its metadata file next to it, the state of a run in progress, the lock."""

    out: Path
    meta: Path
    state: Path
    lock: Path

    @classmethod
    def of(cls, out: str | Path) -> OutputFiles:
        path = Path(out).expanduser()
        return cls(path, path.with_name(path.name + ".meta.json"), path.with_name(f".{path.name}.partial"),
                   path.with_name(f".{path.name}.lock"))


def check_out(job: EmbedJob, out: OutputFiles) -> None:
    if out.out.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out {job.out}: the output must end in .npy or .safetensors")
    if out.out.is_dir():
        raise UsageError(f"--out {job.out} is a directory; give a file name ending in .npy or .safetensors")
    if not out.out.parent.is_dir():
        raise UsageError(f"--out {job.out}: the folder {out.out.parent} does not exist")


def already_complete(job: EmbedJob, out: OutputFiles) -> bool:
    """Check the output options against what is on disk. True: ``--resume`` of a finished output."""
    partial = out.state
    if out.out.exists() and not job.overwrite:
        if job.resume and not partial.exists():
            problem = published_mismatch(out.out)
            if problem:
                raise UsageError(f"{out.out} exists but {problem}: pass --overwrite to recompute it")
            return True
        if not job.resume:
            if partial.exists():
                raise UsageError(
                    f"{out.out} exists, and an interrupted run of it is saved in {partial}: pass --resume to "
                    "finish that run (it replaces the output), or --overwrite to start over"
                )
            raise UsageError(f"{out.out} exists: pass --overwrite to replace it")
        # else: an interrupted --overwrite run of this output; resuming it replaces the output at the end.
    if partial.exists() and not (job.resume or job.overwrite):
        raise UsageError(
            f"an interrupted run of this output is in {partial}: pass --resume to continue it "
            "or --overwrite to start over"
        )
    return False


def _row(listing: Listing, i: int) -> dict:
    """What the metadata file says about input ``i``."""
    if listing.modality == "text":
        return {"line": listing.rows[i]["line"], "text": listing.items[i]}
    return {"path": listing.items[i]}


@dataclass(frozen=True)
class SingleFileWriter:
    """The engines' side of this writer: skips are reported batch by batch; the output is written by
    ``publish`` once every part is saved."""

    listing: Listing

    def part_saved(self, part: dict) -> list[str]:
        return [f"altclip-fast: skipped {self.listing.items[int(i)]}: {r}"
                for i, ok, r in zip(part["idx"], part["ok"], part["reason"]) if not ok]

    def assemble(self, k: int, shard: range) -> list[dict]:
        return []

    def skipped_line(self, skip: dict) -> str:
        return f"altclip-fast: skipped {skip.get('path', skip.get('line'))}: {skip['reason']}"

    def listing_lines(self) -> list[str]:
        return [self.skipped_line(s) for s in self.listing.skipped if "path" in s]

    def interrupted(self, work: Work, shards_written: int, batches_written: int, batches_left: int) -> str:
        saved = sum(1 for _ in (work.state / "parts").rglob("*.npz"))
        # --resume continues this run whether or not it was started with --overwrite.
        return (f"{saved} of {saved + batches_left - batches_written} batches are saved: "
                "rerun the same command with --resume to finish")


def publish(job: EmbedJob, out: OutputFiles, work: Work, session, seconds: float) -> int:
    """The output and its metadata from the parts, published metadata last; then the state goes."""
    listing = work.listing
    rows, skipped = _collect(work)
    embedded = len(rows)
    if embedded == 0:
        shutil.rmtree(out.state)
        for s in skipped:
            print(f"altclip-fast: skipped {s.get('path', s.get('line'))}: {s['reason']}", file=sys.stderr)
        raise AltCLIPError(f"none of the {len(listing.items)} inputs could be embedded; nothing written")
    dim = session.model.config.projection_dim
    info = {"kind": listing.modality, "input": job.input, "model": job.model, "dtype": session.dtype_name,
            "normalized": bool(job.normalize), "exif_transpose": job.exif_transpose,
            "fast_decode": bool(job.fast_decode), "count": embedded, "dim": dim}
    batches = sum(1 for _ in (out.state / "parts").rglob("*.npz"))
    then = f"rerun the same command with --resume (all {batches} batches are kept in {out.state})"
    # Part by part, so that the output never has to fit in memory at once.
    parts = (p["embedding"][p["ok"]] for p in read_rows(out.state, 0, work.shards[0], ("ok", "embedding")))
    data_tmp = files.temp(out.out)
    with files.Writing(out.out, data_tmp, then) as f:
        if out.out.suffix == ".npy":
            nbytes, digest = _write_npy(f, parts, embedded, dim)
        else:
            nbytes, digest = _write_safetensors(f, parts, embedded, dim, {k: str(v) for k, v in info.items()})
    meta = {**info, "output": out.out.name, "output_bytes": nbytes, "output_sha256": digest,
            "rows": [{"row": r, **row} for r, row in enumerate(rows)],
            "skipped": [{k: v for k, v in s.items() if k not in ("category", "key")} for s in skipped]}
    meta_tmp = files.temp(out.meta)
    try:
        with files.Writing(out.meta, meta_tmp, then) as f:
            f.write(json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))
    except BaseException:
        files.remove(data_tmp)
        raise
    # Publish: no old metadata may stand next to the new output, and the new metadata, renamed
    # last, is the mark of a finished run. Until the partial directory goes, --resume redoes this.
    files.remove(out.meta)
    files.replace(data_tmp, out.out, then)
    faults.before_meta()
    files.replace(meta_tmp, out.meta, then)
    shutil.rmtree(out.state)
    print(_summary(listing, out, work, embedded, skipped, seconds))
    return 0


def _collect(work: Work) -> tuple[list[dict], list[dict]]:
    """The metadata rows of the embedded inputs in output order, and the skipped inputs (with a
    ``category`` for the summary)."""
    listing = work.listing
    rows = []
    skipped = [{**s, "category": s.get("category", s["reason"])} for s in listing.skipped]
    for p in read_rows(work.state, 0, work.shards[0], ("idx", "ok", "reason")):
        for i, ok, reason in zip(p["idx"].tolist(), p["ok"].tolist(), p["reason"].tolist()):
            if ok:
                rows.append(_row(listing, i))
            else:
                skipped.append({**_row(listing, i), "reason": reason, "category": "unreadable"})
    return rows, skipped


def _summary(listing: Listing, out: OutputFiles, work: Work, embedded: int, skipped: list[dict],
             seconds: float) -> str:
    noun = "images" if listing.modality == "image" else "captions"
    reused = work.reused
    computed = len(listing.items) - reused
    text = f"embedded {embedded} {noun} into {out.out}"
    if reused:
        text += f" ({reused} reused from the interrupted run, {computed} computed now)"
    rate = computed / seconds if seconds > 0 else 0.0
    text += f" in {seconds:.1f}s ({rate:.1f} {noun}/s)"
    if skipped:
        kinds = Counter(s["category"] for s in skipped)
        text += f"; skipped {len(skipped)}: " + ", ".join(f"{n} {c}" for c, n in sorted(kinds.items()))
        text += f" (listed in {out.meta})"
    else:
        text += "; skipped 0"
    return text


def _write_npy(f, parts, rows: int, dim: int) -> tuple[int, str]:
    """The ``.npy`` format written with plain writes (no memory map: see ``files``)."""
    out = files.Hashing(f)
    header = files.npy_header({"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
    files.reserve(f, len(header) + rows * dim * 4)
    out.write(header)
    row = 0
    for part in parts:
        out.write(np.ascontiguousarray(part, dtype="<f4").tobytes())
        row += len(part)
    if row != rows:
        raise AltCLIPError(f"internal error: the parts hold {row} rows, the index {rows}")
    return out.nbytes, out.sha.hexdigest()


def _write_safetensors(f, parts, rows: int, dim: int, metadata: dict[str, str]) -> tuple[int, str]:
    """One F32 tensor "embeddings" in the safetensors layout: u64 header size, JSON header padded
    to 8 bytes, little-endian data."""
    nbytes = rows * dim * 4
    header = {"__metadata__": metadata, "embeddings": {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, nbytes]}}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    out = files.Hashing(f)
    files.reserve(f, 8 + len(raw) + nbytes)
    out.write(len(raw).to_bytes(8, "little"))
    out.write(raw)
    written = 0
    for part in parts:
        data = np.ascontiguousarray(part, dtype="<f4").tobytes()
        out.write(data)
        written += len(data)
    if written != nbytes:
        raise AltCLIPError(f"internal error: the parts hold {written} bytes of embeddings, expected {nbytes}")
    return out.nbytes, out.sha.hexdigest()


# ---------------------------------------------------------------------------------------------- reading


def _output_rows(out: Path) -> int:
    with open(out, "rb") as f:
        if out.suffix == ".npy":
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return int(read(f)[0][0])
        size = int.from_bytes(f.read(8), "little")
        return int(json.loads(f.read(size))["embeddings"]["shape"][0])


def published_mismatch(out: str | Path, *, verify: bool = False) -> str | None:
    """Why ``out`` and ``<out>.meta.json`` do not belong to the same finished run, in words; None
    when they do (row count and size checked; with ``verify``, the sha256 of the whole file too)."""
    paths = OutputFiles.of(out)
    if not paths.meta.is_file():
        return f"its metadata file {paths.meta} is missing"
    try:
        meta = json.loads(paths.meta.read_text(encoding="utf-8"))
        rows = _output_rows(paths.out)
    except (OSError, ValueError, KeyError) as exc:
        return f"it or its metadata cannot be read ({exc})"
    if meta.get("output") != paths.out.name or meta.get("count") != rows or len(meta.get("rows", ())) != rows:
        return f"its metadata {paths.meta} describes another output ({meta.get('count')} rows, the file has {rows})"
    if "output_bytes" in meta and meta["output_bytes"] != paths.out.stat().st_size:
        return f"its metadata {paths.meta} describes another output (size differs)"
    if verify and "output_sha256" in meta:
        sha = hashlib.sha256()
        with open(paths.out, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        if sha.hexdigest() != meta["output_sha256"]:
            return f"its content does not match the sha256 in {paths.meta}"
    return None


def load_embeddings(out: str | Path, *, verify: bool = False) -> tuple[np.ndarray, dict]:
    """An ``embed`` output and its metadata, checked to belong to the same finished run."""
    problem = published_mismatch(out, verify=verify)
    if problem:
        raise AltCLIPError(f"{out}: {problem}")
    paths = OutputFiles.of(out)
    meta = json.loads(paths.meta.read_text(encoding="utf-8"))
    if paths.out.suffix == ".npy":
        return np.load(paths.out), meta
    from safetensors.numpy import load_file

    return load_file(str(paths.out))["embeddings"], meta
