"""``altclip-fast embed``: a folder, glob or caption file -> embeddings on disk, nothing lost.

How a run is kept safe:

- Inputs are listed and sorted up front and cut into batches of ``--batch-size``. Batch ``k`` is
  written, as soon as it is computed, to ``.<out>.partial/batch-<k>.npz`` through a temporary file
  and a rename, so a batch file on disk is always complete.
- ``.<out>.partial/plan.json`` records what the run computes (the inputs' digest, model, dtype,
  normalisation, batch size). ``--resume`` checks it and computes only the batches that have no file.
- When every batch is done, ``<out>.meta.json`` (rows -> inputs, skipped inputs and why) and then the
  output itself are written to temporary names and renamed into place. The output appears last,
  so an output file always means a finished run; the partial directory is removed after that.
- An image that cannot be read is reported, recorded in the metadata and skipped; it never stops
  the run. Decoding and resizing run in DataLoader worker processes (``--workers``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import AltCLIPError, UsageError
from ..model_files import read_json

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)
OUTPUT_SUFFIXES = (".npy", ".safetensors")
PLAN_VERSION = 1

# Fault injection for the tests: SIGKILL this process right after that many batch files are
# written, the way an OOM killer or a lost SSH session would end a real run.
_CRASH_AFTER_BATCHES = "_ALTCLIP_FAST_CRASH_AFTER_BATCHES"


@dataclass
class Inputs:
    kind: str  # "image" or "text"
    items: list[str]  # paths, or captions
    rows: list[dict]  # per item, what the metadata file says about it
    skipped: list[dict] = field(default_factory=list)  # dropped before embedding (blank lines)


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _is_image_name(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def find_inputs(spec: str) -> Inputs:
    """A folder (recursive), a glob, an image file, or a text file with one caption per line."""
    path = Path(spec).expanduser()
    if not path.exists() and _has_glob(spec):
        matches = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        images = [p for p in matches if _is_image_name(p)]
        if not images:
            raise UsageError(f"{spec}: no image files match this pattern")
        return Inputs("image", images, [{"path": p} for p in images])
    if not path.exists():
        raise UsageError(f"{spec}: no such file or directory")
    if path.is_dir():
        images = sorted(str(p) for p in path.rglob("*") if p.is_file() and _is_image_name(p.name))
        if not images:
            raise UsageError(
                f"{spec}: no images found in this folder or below (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        return Inputs("image", images, [{"path": p} for p in images])
    if _is_image_name(path.name):
        return Inputs("image", [str(path)], [{"path": str(path)}])
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{spec}: not UTF-8 text (expected an image folder, a glob, or one caption per line)") from None
    inputs = Inputs("text", [], [])
    for number, line in enumerate(lines, start=1):
        if line.strip():
            inputs.items.append(line)
            inputs.rows.append({"line": number, "text": line})
        else:
            inputs.skipped.append({"line": number, "reason": "blank line"})
    if not inputs.items:
        raise UsageError(f"{spec}: no captions (the file has no non-blank lines)")
    return inputs


# ---------------------------------------------------------------------------------------------- files


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class PartialRun:
    """The batch files of a run in progress, in ``.<out>.partial/``."""

    def __init__(self, directory: Path):
        self.directory = directory

    def start(self, plan: dict, resume: bool) -> dict:
        """Create the directory, or check that the run found there computes the same thing.
        Returns the plan in force (a resumed run keeps its batch size)."""
        plan_file = self.directory / "plan.json"
        if resume and plan_file.is_file():
            old = read_json(plan_file, error=UsageError, what="the interrupted run's plan")
            differ = [k for k in plan if k != "batch_size" and old.get(k) != plan[k]]
            if differ:
                details = ", ".join(f"{k}: {old.get(k)!r} then, {plan[k]!r} now" for k in differ)
                raise UsageError(
                    f"cannot resume: the interrupted run in {self.directory} computed something else ({details}); "
                    "rerun with its options or pass --overwrite to start over"
                )
            for stale in self.directory.glob(".*.tmp"):
                stale.unlink()
            return old
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        tmp = self.directory / ".plan.json.tmp"
        tmp.write_text(json.dumps(plan, indent=1), encoding="utf-8")
        _fsync_replace(tmp, plan_file)
        return plan

    def batch_file(self, k: int) -> Path:
        return self.directory / f"batch-{k:06d}.npz"

    def done(self, count: int) -> set[int]:
        """Batches with a readable file. A file that fails to load is deleted and recomputed."""
        done = set()
        for k in range(count):
            path = self.batch_file(k)
            if path.is_file():
                try:
                    with np.load(path, allow_pickle=False) as data:
                        for key in ("embeddings", "indices", "skipped", "reasons"):
                            data[key]  # reads the member in full: a torn file fails its CRC here
                    done.add(k)
                except Exception:
                    path.unlink()
        return done

    def write(self, k: int, embeddings: np.ndarray, indices: list[int], skipped: list[int], reasons: list[str]) -> None:
        tmp = self.directory / f".batch-{k:06d}.npz.tmp"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                embeddings=embeddings.astype(np.float32, copy=False),
                indices=np.asarray(indices, dtype=np.int64),
                skipped=np.asarray(skipped, dtype=np.int64),
                reasons=np.asarray(reasons, dtype=str),
            )
        # No fsync per batch (it would throttle fast GPUs): a killed process leaves complete files
        # either way, and after a power loss a torn file fails the CRC check in `done` and is redone.
        os.replace(tmp, self.batch_file(k))

    def read_index(self, k: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Which inputs batch ``k`` embedded and which it skipped (and why); embeddings stay on disk."""
        with np.load(self.batch_file(k), allow_pickle=False) as data:
            return data["indices"], data["skipped"], [str(r) for r in data["reasons"]]

    def read_embeddings(self, k: int) -> np.ndarray:
        with np.load(self.batch_file(k), allow_pickle=False) as data:
            return data["embeddings"]


# ---------------------------------------------------------------------------------------------- compute


class _ImageFiles:
    """Dataset of image paths -> (index, uint8 crop or None, reason); runs in DataLoader workers."""

    def __init__(self, paths: list[str], image_processor):
        self.paths = paths
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            return index, self.image_processor.prepare(path), None
        except AltCLIPError as exc:
            return index, None, str(exc).removeprefix(f"{path}: ")
        except Exception as exc:  # a decoder bug on one odd file must not end a long run
            return index, None, f"{type(exc).__name__}: {exc}"


def collate_crops(batch):
    """In the worker: stack the readable crops into one uint8 array, keep the failures' reasons."""
    ok = [(i, crop) for i, crop, _ in batch if crop is not None]
    failed = [(i, reason) for i, crop, reason in batch if crop is None]
    crops = np.stack([crop for _, crop in ok]) if ok else None
    return [i for i, _ in ok], crops, [i for i, _ in failed], [reason for _, reason in failed]


def default_workers() -> int:
    """One worker per spare core (up to 16): on a GPU, decoding and resizing camera-sized photos is
    slower than the model, so every core helps (rates per core: bench/bench_preprocess.py, bench/RESULTS.md)."""
    return max(0, min(16, (os.cpu_count() or 1) - 1))


def _image_batches(inputs: Inputs, pending: list[list[int]], session, workers: int):
    """Yield ``(indices, uint8 crops [B, 3, H, W] or None, skipped, reasons)`` per pending batch, in order."""
    import torch
    from torch.utils.data import DataLoader

    ip = session.processor.image_processor
    loader = DataLoader(
        _ImageFiles(inputs.items, ip),
        batch_sampler=pending,
        num_workers=workers,
        collate_fn=collate_crops,
    )
    for indices, crops, skipped, reasons in loader:
        yield indices, None if crops is None else torch.from_numpy(crops), skipped, reasons


def _text_batches(inputs: Inputs, pending: list[list[int]], session):
    tokenizer = session.processor.tokenizer
    for indices in pending:
        encoded = tokenizer([inputs.items[i] for i in indices])
        yield indices, encoded, [], []


def _embed(session, kind: str, payload, normalize: bool) -> np.ndarray:
    import torch

    model, device = session.model, session.device
    with torch.inference_mode():
        if kind == "image":
            # Normalised on the model's device: uint8 travels, float32 is made where it is used.
            pixels = session.processor.image_processor.to_pixel_values_torch(payload.to(device))
            features = model.get_image_features(pixels.to(session.dtype))
        else:
            features = model.get_text_features(payload["input_ids"].to(device), payload["attention_mask"].to(device))
        features = features.float()
        if normalize:
            features = features / features.norm(dim=-1, keepdim=True)
        return features.cpu().numpy()


# ---------------------------------------------------------------------------------------------- run


@dataclass(frozen=True)
class EmbedJob:
    """What ``altclip-fast embed`` was asked to do (its command line, minus the model options)."""

    input: str  # folder, glob, image file or caption file
    out: str  # .npy or .safetensors
    model: str  # as the user named it, for the metadata
    batch_size: int
    workers: int | None  # None: default_workers()
    normalize: bool
    resume: bool
    overwrite: bool
    progress: bool
    exif_transpose: bool
    fast_decode: bool


@dataclass(frozen=True)
class OutputFiles:
    """The output, its metadata file next to it, and the batch files of a run in progress."""

    out: Path
    meta: Path
    partial: PartialRun

    @classmethod
    def of(cls, out: str) -> OutputFiles:
        path = Path(out).expanduser()
        return cls(path, path.with_name(path.name + ".meta.json"), PartialRun(path.with_name(f".{path.name}.partial")))


def run(job: EmbedJob, open_session: Callable[[], object]) -> int:
    """Embed ``job.input`` into ``job.out``. ``open_session()`` gives the model, processor, device and
    dtype (see ``altclip_fast.apps.cli.Session``); it is called once the job's inputs are checked."""
    files = OutputFiles.of(job.out)
    if _already_complete(job, files):
        print(f"{files.out} is already complete; nothing to resume (pass --overwrite to recompute it)")
        return 0
    workers = default_workers() if job.workers is None else job.workers
    if workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}")
    inputs = find_inputs(job.input)
    if not files.out.parent.is_dir():
        raise UsageError(f"--out {job.out}: the folder {files.out.parent} does not exist")

    session = open_session()
    plan = files.partial.start(_plan(job, inputs, session), resume=job.resume and not job.overwrite)
    if plan["batch_size"] != job.batch_size:
        print(f"altclip-fast: resuming with the interrupted run's --batch-size {plan['batch_size']}", file=sys.stderr)
    embed_run = _Run(job, inputs, files, session, plan)
    seconds = embed_run.compute(workers)
    return embed_run.finish(seconds)


def _already_complete(job: EmbedJob, files: OutputFiles) -> bool:
    """Check the output options against what is on disk. True: ``--resume`` of a finished output."""
    if files.out.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out {job.out}: the output must end in .npy or .safetensors")
    if files.out.is_dir():
        raise UsageError(f"--out {job.out} is a directory; give a file name ending in .npy or .safetensors")
    if files.out.exists() and not job.overwrite:
        if job.resume and not files.partial.directory.exists():
            return True
        if not job.resume:
            raise UsageError(f"{files.out} exists: pass --overwrite to replace it")
        # else: an interrupted --overwrite run of this output; resuming it replaces the output at the end.
    if files.partial.directory.exists() and not (job.resume or job.overwrite):
        raise UsageError(
            f"an interrupted run of this output is in {files.partial.directory}: pass --resume to continue it "
            "or --overwrite to start over"
        )
    return False


def _plan(job: EmbedJob, inputs: Inputs, session) -> dict:
    """What the run computes: a resumed run must compute the same (the batch size may differ)."""
    digest = hashlib.sha256("\n".join(json.dumps(r, ensure_ascii=False) for r in inputs.rows).encode()).hexdigest()
    return {
        "version": PLAN_VERSION,
        "kind": inputs.kind,
        "count": len(inputs.items),
        "inputs_sha256": digest,
        "model": str(session.model_dir.resolve()),
        "dtype": str(session.dtype).removeprefix("torch."),
        "normalize": bool(job.normalize),
        "exif_transpose": job.exif_transpose,
        "fast_decode": bool(job.fast_decode),
        "batch_size": job.batch_size,
    }


class _Run:
    """A started run: its inputs cut into batches of the plan's size, some already done on disk."""

    def __init__(self, job: EmbedJob, inputs: Inputs, files: OutputFiles, session, plan: dict):
        self.job, self.inputs, self.files, self.session, self.plan = job, inputs, files, session, plan
        n, size = len(inputs.items), plan["batch_size"]
        self.batches = [list(range(start, min(n, start + size))) for start in range(0, n, size)]
        done = files.partial.done(len(self.batches))
        self.pending = [batch for k, batch in enumerate(self.batches) if k not in done]
        self.reused = sum(len(self.batches[k]) for k in done)
        self.computed = sum(len(b) for b in self.pending)

    def compute(self, workers: int) -> float:
        """Embed the pending batches, writing each one's file as it is done. Returns the seconds it took."""
        from tqdm import tqdm

        job, inputs, session = self.job, self.inputs, self.session
        session.model  # loaded before the clock starts, so that the rate shown is the embedding rate
        print(f"altclip-fast: embedding with {session.describe()}", file=sys.stderr)
        crash_after = int(os.environ.get(_CRASH_AFTER_BATCHES, "0") or 0)
        written = 0
        started = time.perf_counter()
        bar = tqdm(total=len(inputs.items), initial=self.reused, unit=" img" if inputs.kind == "image" else " text",
                   disable=not job.progress, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        batch_of = {batch[0]: k for k, batch in enumerate(self.batches)}
        try:
            source = (_image_batches(inputs, self.pending, session, workers) if inputs.kind == "image"
                      else _text_batches(inputs, self.pending, session))
            for batch, (indices, payload, skipped, reasons) in zip(self.pending, source):
                if payload is None:
                    embeddings = np.zeros((0, session.model.config.projection_dim), dtype=np.float32)
                else:
                    embeddings = _embed(session, inputs.kind, payload, job.normalize)
                self.files.partial.write(batch_of[batch[0]], embeddings, indices, skipped, reasons)
                written += 1
                for i, reason in zip(skipped, reasons):
                    bar.write(f"altclip-fast: skipped {inputs.items[i]}: {reason}", file=sys.stderr)
                bar.update(len(batch))
                if crash_after and written >= crash_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        except KeyboardInterrupt:
            bar.close()
            saved = len(self.batches) - len(self.pending) + written
            print(f"altclip-fast: interrupted; {saved} of {len(self.batches)} batches are saved: "
                  "rerun the same command with --resume to finish", file=sys.stderr)
            raise
        bar.close()
        return time.perf_counter() - started

    def finish(self, seconds: float) -> int:
        """Metadata, then the output, from the batch files; the partial directory goes last."""
        files = self.files
        rows, skipped, sizes = self._collect()
        embedded = len(rows)
        if embedded == 0:
            shutil.rmtree(files.partial.directory)
            for s in skipped:
                print(f"altclip-fast: skipped {s.get('path', s.get('line'))}: {s['reason']}", file=sys.stderr)
            raise AltCLIPError(f"none of the {len(self.inputs.items)} inputs could be embedded; nothing written")
        dim = self.session.model.config.projection_dim
        info = {
            "kind": self.inputs.kind, "input": self.job.input, "model": self.job.model, "dtype": self.plan["dtype"],
            "normalized": self.plan["normalize"], "exif_transpose": self.plan["exif_transpose"],
            "fast_decode": self.plan["fast_decode"], "count": embedded, "dim": dim,
        }
        self._write_meta(info, rows, skipped)
        # Batch by batch, so that the output never has to fit in memory at once.
        parts = (files.partial.read_embeddings(k) for k, size in enumerate(sizes) if size)
        data_tmp = files.out.with_name(f".{files.out.name}.tmp")
        if files.out.suffix == ".npy":
            _write_npy(data_tmp, parts, embedded, dim)
        else:
            _write_safetensors(data_tmp, parts, embedded, dim, {k: str(v) for k, v in info.items()})
        _fsync_replace(data_tmp, files.out)
        shutil.rmtree(files.partial.directory)
        print(self._summary(embedded, skipped, seconds))
        return 0

    def _collect(self) -> tuple[list[dict], list[dict], list[int]]:
        """The metadata rows of the embedded inputs in output order, the skipped inputs (with a
        ``category`` for the summary), and the number of rows per batch file."""
        rows, skipped = [], [{**s, "category": s["reason"]} for s in self.inputs.skipped]
        sizes = []
        for k in range(len(self.batches)):
            indices, skipped_idx, reasons = self.files.partial.read_index(k)
            sizes.append(len(indices))
            rows.extend(self.inputs.rows[i] for i in indices.tolist())
            for i, reason in zip(skipped_idx.tolist(), reasons):
                skipped.append({**self.inputs.rows[i], "reason": reason, "category": "unreadable"})
        return rows, skipped, sizes

    def _write_meta(self, info: dict, rows: list[dict], skipped: list[dict]) -> None:
        meta = self.files.meta
        meta_tmp = meta.with_name(f".{meta.name}.tmp")
        meta_tmp.write_text(json.dumps({
            **info,
            "output": self.files.out.name,
            "rows": [{"row": r, **row} for r, row in enumerate(rows)],
            "skipped": [{k: v for k, v in s.items() if k != "category"} for s in skipped],
        }, ensure_ascii=False, indent=1), encoding="utf-8")
        _fsync_replace(meta_tmp, meta)

    def _summary(self, embedded: int, skipped: list[dict], seconds: float) -> str:
        noun = "images" if self.inputs.kind == "image" else "captions"
        text = f"embedded {embedded} {noun} into {self.files.out}"
        if self.reused:
            text += f" ({self.reused} reused from the interrupted run, {self.computed} computed now)"
        rate = self.computed / seconds if seconds > 0 else 0.0
        text += f" in {seconds:.1f}s ({rate:.1f} {noun}/s)"
        if skipped:
            kinds = Counter(s["category"] for s in skipped)
            text += f"; skipped {len(skipped)}: " + ", ".join(f"{n} {c}" for c, n in sorted(kinds.items()))
            text += f" (listed in {self.files.meta})"
        else:
            text += "; skipped 0"
        return text


def _write_npy(path: Path, parts, rows: int, dim: int) -> None:
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    row = 0
    for part in parts:
        array[row : row + len(part)] = part
        row += len(part)
    if row != rows:
        raise AltCLIPError(f"internal error: batch files hold {row} rows, the index {rows}")
    array.flush()
    del array


def _write_safetensors(path: Path, parts, rows: int, dim: int, metadata: dict[str, str]) -> None:
    """One F32 tensor "embeddings" in the safetensors layout: u64 header size, JSON header padded
    to 8 bytes, little-endian data."""
    nbytes = rows * dim * 4
    header = {"__metadata__": metadata, "embeddings": {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, nbytes]}}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    written = 0
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for part in parts:
            data = np.ascontiguousarray(part, dtype="<f4").tobytes()
            f.write(data)
            written += len(data)
    if written != nbytes:
        raise AltCLIPError(f"internal error: batch files hold {written} bytes of embeddings, expected {nbytes}")
