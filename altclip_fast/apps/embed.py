"""``altclip-fast embed``: a folder, glob or caption file -> embeddings on disk, nothing lost.

How a run is kept safe:

- One run at a time per output: a lock (``.<out>.lock``, ``flock``) is taken before anything on
  disk is looked at or changed; a second run exits with status 2. The output folder is probed with
  a small file first, so an unwritable folder is a one-line error before the model loads.
- Inputs are listed and sorted up front and cut into batches of ``--batch-size``. Batch ``k`` is
  written, as soon as it is computed, to ``.<out>.partial/batch-<k>.npz`` through a temporary file
  and a rename, so a batch file on disk is always complete.
- ``.<out>.partial/plan.json`` records what the run computes (a digest of the inputs' resolved
  paths, model, dtype, normalisation, batch size), and ``inputs.json`` each image's resolved path,
  size and mtime. ``--resume`` checks the plan, recomputes the batches of inputs that changed since,
  and computes only the batches that have no file. With ``--overwrite`` too, a plan that does not
  match is discarded instead of refused.
- When every batch is done, the output and then ``<out>.meta.json`` (rows -> inputs, skipped inputs
  and why, the output's row count, size and sha256) are written to temporary names. The old
  metadata is removed, the output renamed into place, and the metadata renamed last: a metadata
  file next to an output always describes it (``load_embeddings`` checks that), and the partial
  directory, removed after both, keeps a run resumable until then.
- Every write goes through ``open`` here; a full disk (or any other write error) removes the
  temporary file and ends the run with one line naming the file, saying the run can be resumed.
  The output is written with plain writes, never a memory map: a page of a memory-mapped file that
  cannot be backed on a full disk kills the process with SIGBUS. Its space is reserved first where
  the file system supports it.
- Symlinks: links to files are followed; links to folders are not (they are listed as skipped, as
  are broken and looping links), so a walk never loops. A file reached under several names is
  embedded once, under its first name in sorted order (a real name before a link); the others are
  listed as skipped. Glob patterns follow the same policy (they are matched here, not by ``glob``).
- An image that cannot be read is reported, recorded in the metadata and skipped; it never stops
  the run. Decoding and resizing run in DataLoader worker processes (``--workers``).
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
import stat
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import AltCLIPError, UsageError
from ..model_files import read_json
from . import faults

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)
OUTPUT_SUFFIXES = (".npy", ".safetensors")
PLAN_VERSION = 2

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; its text says what is saved and how to finish (printed once, by the CLI)."""


@dataclass
class Inputs:
    kind: str  # "image" or "text"
    items: list[str]  # paths, or captions
    rows: list[dict]  # per item, what the metadata file says about it
    skipped: list[dict] = field(default_factory=list)  # left out before embedding, with the reason
    keys: list[str] = field(default_factory=list)  # images: resolved paths, what a resumed run is keyed on
    stats: list[list[int]] = field(default_factory=list)  # images: [size, mtime_ns] per item


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _is_image_name(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------------- inputs


def _name_matches(name: str, pattern: str) -> bool:
    # As glob: a leading dot is matched only by a pattern that starts with one.
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _path_matches(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    """Whether the path components ``parts`` match the glob components ``pats`` (``**``: any depth)."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return _path_matches(parts, pats[1:]) or (
            bool(parts) and not parts[0].startswith(".") and _path_matches(parts[1:], pats))
    return bool(parts) and _name_matches(parts[0], pats[0]) and _path_matches(parts[1:], pats[1:])


def _may_hold_matches(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    """Whether something below the folder ``parts`` could match ``pats``."""
    if not parts:
        return bool(pats)
    if not pats:
        return False
    if pats[0] == "**":
        return _may_hold_matches(parts, pats[1:]) or (
            not parts[0].startswith(".") and _may_hold_matches(parts[1:], pats))
    return _name_matches(parts[0], pats[0]) and _may_hold_matches(parts[1:], pats[1:])


def _split_glob(spec: str) -> tuple[str, tuple[str, ...]]:
    """``'photos/**/*.jpg'`` -> ``('photos', ('**', '*.jpg'))``: the folder to walk and the pattern below it."""
    parts = spec.split(os.sep)
    fixed = 0
    while fixed < len(parts) - 1 and not _has_glob(parts[fixed]):
        fixed += 1
    root = os.sep.join(parts[:fixed]) if fixed else ""
    if spec.startswith(os.sep) and not root:
        root = os.sep
    return root, tuple(p for p in parts[fixed:] if p not in ("", "."))


def _scan_images(root: str, pats: tuple[str, ...] | None) -> tuple[list[tuple[str, bool, os.stat_result]], list[dict]]:
    """Walk ``root`` (every image below it, or those matching ``pats``) without following folder links.
    Returns ``(path, is_link, stat)`` per image file and the entries left out, with their reasons."""
    found, skipped = [], []
    stack = [(root, ())]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = sorted(os.scandir(folder or "."), key=lambda e: e.name)
        except OSError as exc:
            skipped.append({"path": folder, "reason": f"cannot list folder: {exc.strerror or exc}",
                            "category": "unreadable folder"})
            continue
        subfolders = []
        for entry in entries:
            parts = (*rel, entry.name)
            path = os.path.join(folder, entry.name) if folder else entry.name
            wanted = _is_image_name(entry.name) and (pats is None or _path_matches(parts, pats))
            try:
                is_link = entry.is_symlink()
                if entry.is_dir(follow_symlinks=False):
                    if pats is None or _may_hold_matches(parts, pats):
                        subfolders.append((path, parts))
                    continue
                st = os.stat(path) if is_link else entry.stat(follow_symlinks=False)
            except OSError as exc:
                if wanted:
                    reason, category = (
                        ("broken symbolic link", "broken link") if exc.errno == errno.ENOENT else
                        ("symbolic link loop", "link loop") if exc.errno == errno.ELOOP else
                        (f"cannot stat: {exc.strerror or exc}", "unreadable"))
                    skipped.append({"path": path, "reason": reason, "category": category})
                continue
            if stat.S_ISDIR(st.st_mode):
                if pats is None or _may_hold_matches(parts, pats):
                    skipped.append({"path": path, "reason": "symbolic link to a folder (not followed)",
                                    "category": "folder link"})
            elif stat.S_ISREG(st.st_mode) and wanted:
                found.append((path, is_link, st))
        stack.extend(reversed(subfolders))
    return found, skipped


def _image_inputs(found: list[tuple[str, bool, os.stat_result]], skipped: list[dict]) -> Inputs:
    """One row per real file: the first of its names in sorted order, a real name before a link."""
    inputs = Inputs("image", [], [], skipped)
    by_file: dict[tuple[int, int], list[tuple[bool, str, os.stat_result]]] = {}
    for path, is_link, st in found:
        by_file.setdefault((st.st_dev, st.st_ino), []).append((is_link, path, st))
    chosen = []
    for names in by_file.values():
        names.sort()
        _, path, st = names[0]
        chosen.append((path, st))
        for _, other, _ in names[1:]:
            inputs.skipped.append({"path": other, "reason": f"same file as {path}", "category": "duplicate"})
    for path, st in sorted(chosen):
        inputs.items.append(path)
        inputs.rows.append({"path": path})
        inputs.keys.append(os.path.realpath(path))
        inputs.stats.append([st.st_size, st.st_mtime_ns])
    inputs.skipped.sort(key=lambda s: s["path"])
    return inputs


def read_caption_lines(path: Path) -> list[str]:
    """Lines end at ``\\n`` or ``\\r\\n`` only (not at U+2028, U+0085, form feeds or a lone ``\\r``,
    which ``str.splitlines`` also splits at), and a UTF-8 byte order mark is not part of the text."""
    text = path.read_bytes().decode("utf-8-sig")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def find_inputs(spec: str) -> Inputs:
    """A folder (recursive), a glob, an image file, or a text file with one caption per line."""
    path = Path(spec).expanduser()
    if not path.exists() and _has_glob(spec):
        root, pats = _split_glob(os.path.expanduser(spec))
        inputs = _image_inputs(*_scan_images(root, pats))
        if not inputs.items:
            raise UsageError(f"{spec}: no image files match this pattern")
        return inputs
    if not path.exists():
        raise UsageError(f"{spec}: no such file or directory")
    if path.is_dir():
        inputs = _image_inputs(*_scan_images(str(path), None))
        if not inputs.items:
            raise UsageError(
                f"{spec}: no images found in this folder or below (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        return inputs
    if _is_image_name(path.name):
        return _image_inputs([(str(path), False, path.stat())], [])
    try:
        lines = read_caption_lines(path)
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


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def write_error(path: Path, exc: OSError, then: str) -> AltCLIPError:
    """One line for a failed write: what, why, and what to do next (``then``)."""
    if exc.errno in _DISK_FULL:
        return AltCLIPError(f"cannot write {path}: no space left on device; free some space, then {then}")
    return AltCLIPError(f"cannot write {path}: {exc.strerror or exc}; {then}")


class _Writing:
    """``with _Writing(final, tmp, then) as f:`` writes ``tmp`` (fsynced when ``sync``), and on any
    error removes it; an ``OSError`` becomes a one-line ``AltCLIPError`` naming ``final``. The caller
    renames ``tmp`` into place."""

    def __init__(self, final: Path, tmp: Path, then: str, *, sync: bool = True):
        self.final, self.tmp, self.then, self.sync = final, tmp, then, sync

    def __enter__(self):
        try:
            self.file = open(self.tmp, "wb")
        except OSError as exc:
            raise write_error(self.final, exc, self.then) from None
        return self.file

    def __exit__(self, kind, exc, tb):
        try:
            if kind is None:
                self.file.flush()
                if self.sync:
                    os.fsync(self.file.fileno())
            self.file.close()
        except OSError as late:
            kind, exc = OSError, late
        if kind is None:
            return False
        _remove(self.tmp)
        if isinstance(exc, OSError):
            raise write_error(self.final, exc, self.then) from None
        return False


def _reserve(f, nbytes: int) -> None:
    """Claim the file's space up front, so that a full disk fails here rather than halfway through."""
    if nbytes and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise
            # EOPNOTSUPP, EINVAL: a file system without fallocate; the writes will tell.


def _replace(tmp: Path, final: Path, then: str) -> None:
    try:
        os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        raise write_error(final, exc, then) from None


RESUME_HINT = "rerun the same command with --resume (the batches written so far are kept)"


class PartialRun:
    """The batch files of a run in progress, in ``.<out>.partial/``."""

    def __init__(self, directory: Path):
        self.directory = directory

    def start(self, plan: dict, inputs: Inputs, resume: bool, overwrite: bool = False) -> tuple[dict, list[int]]:
        """Create the directory, or check that the run found there computes the same thing.
        Returns the plan in force (a resumed run keeps its batch size) and the inputs that changed
        (size or mtime) since the interrupted run wrote its plan."""
        plan_file = self.directory / "plan.json"
        if resume and plan_file.is_file():
            old = read_json(plan_file, error=UsageError, what="the interrupted run's plan")
            problem = self._mismatch(old, plan, inputs)
            if problem is None:
                for stale in self.directory.glob(".*.tmp"):
                    stale.unlink()
                return old, self._changed(inputs)
            if not overwrite:
                raise UsageError(f"cannot resume the interrupted run in {self.directory}: {problem}")
            print(f"altclip-fast: the interrupted run in {self.directory} cannot be resumed ({problem}); "
                  "starting over (--overwrite)", file=sys.stderr)
        if self.directory.exists():
            shutil.rmtree(self.directory)
        try:
            self.directory.mkdir(parents=True)
        except OSError as exc:
            raise write_error(self.directory, exc, "run again") from None
        try:
            if inputs.kind == "image":
                self._write_json("inputs.json", {"keys": inputs.keys, "stats": inputs.stats}, "run again")
            self._write_json("plan.json", plan, "run again")
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)  # a directory without a plan is no run to resume
            raise
        return plan, []

    def _write_json(self, name: str, value, then: str) -> None:
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        with _Writing(final, tmp, then) as f:
            f.write(json.dumps(value, indent=1).encode("utf-8"))
        _replace(tmp, final, then)

    def _mismatch(self, old: dict, plan: dict, inputs: Inputs) -> str | None:
        """Why the interrupted run's plan cannot be continued by this one, in words; None if it can."""
        if old.get("version") != plan["version"]:
            return "it was written by another version of altclip-fast; pass --overwrite to start over"
        differ = [k for k in plan if k not in ("batch_size", "inputs_sha256", "count") and old.get(k) != plan[k]]
        if differ:
            details = ", ".join(f"{k}: {old.get(k)!r} then, {plan[k]!r} now" for k in differ)
            return f"it computed something else ({details}); rerun with its options or pass --overwrite to start over"
        if old.get("inputs_sha256") == plan["inputs_sha256"]:
            return None
        if inputs.kind == "text":
            return ("the captions are not those of the interrupted run; "
                    "rerun with the same caption file or pass --overwrite to start over")
        try:
            before = read_json(self.directory / "inputs.json", error=UsageError, what="the interrupted run's inputs")
            old_keys = set(before["keys"])
        except (UsageError, KeyError, TypeError):
            old_keys = set()
        new, gone = sorted(set(inputs.keys) - old_keys), sorted(old_keys - set(inputs.keys))
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in ((new, "new"), (gone, "no longer found")) if v]
        return (f"the input files are not those of the interrupted run ({', '.join(parts) or 'another list'}); "
                "rerun with the same inputs or pass --overwrite to start over")

    def _changed(self, inputs: Inputs) -> list[int]:
        if inputs.kind != "image":
            return []
        try:
            before = read_json(self.directory / "inputs.json", error=UsageError, what="the interrupted run's inputs")
            stats = dict(zip(before["keys"], before["stats"]))
        except (UsageError, KeyError, TypeError):
            return list(range(len(inputs.items)))  # nothing to compare with: trust no batch
        return [i for i, (key, st) in enumerate(zip(inputs.keys, inputs.stats)) if stats.get(key) != st]

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
        final = self.batch_file(k)
        tmp = self.directory / f".batch-{k:06d}.npz.tmp"
        # No fsync per batch (it would throttle fast GPUs): a killed process leaves complete files
        # either way, and after a power loss a torn file fails the CRC check in `done` and is redone.
        with _Writing(final, tmp, RESUME_HINT, sync=False) as f:
            np.savez(
                f,
                embeddings=embeddings.astype(np.float32, copy=False),
                indices=np.asarray(indices, dtype=np.int64),
                skipped=np.asarray(skipped, dtype=np.int64),
                reasons=np.asarray(reasons, dtype=str),
            )
        _replace(tmp, final, RESUME_HINT)

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
            features = model.get_image_features(
                pixels.to(session.dtype), interpolate_pos_encoding=getattr(session, "interpolate_pos_encoding", False)
            )
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
    """The output, its metadata file next to it, the batch files of a run in progress, the lock."""

    out: Path
    meta: Path
    partial: PartialRun
    lock: Path

    @classmethod
    def of(cls, out: str) -> OutputFiles:
        path = Path(out).expanduser()
        return cls(path, path.with_name(path.name + ".meta.json"),
                   PartialRun(path.with_name(f".{path.name}.partial")), path.with_name(f".{path.name}.lock"))

    def temp(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.tmp")


def run(job: EmbedJob, open_session: Callable[[], object]) -> int:
    """Embed ``job.input`` into ``job.out``. ``open_session()`` gives the model, processor, device and
    dtype (see ``altclip_fast.apps.cli.Session``); it is called once the job's inputs are checked."""
    files = OutputFiles.of(job.out)
    _check_out(job, files)
    with exclusive_output(files):
        return _locked_run(job, files, open_session)


def _locked_run(job: EmbedJob, files: OutputFiles, open_session) -> int:
    if _already_complete(job, files):
        print(f"{files.out} is already complete; nothing to resume (pass --overwrite to recompute it)")
        return 0
    workers = default_workers() if job.workers is None else job.workers
    if workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}")
    inputs = find_inputs(job.input)
    # Leftovers of a run killed while writing the output (we hold the lock: nobody else writes them).
    for stale in (files.temp(files.out), files.temp(files.meta)):
        _remove(stale)

    session = open_session()
    plan, changed = files.partial.start(_plan(job, inputs, session), inputs, resume=job.resume,
                                        overwrite=job.overwrite)
    if plan["batch_size"] != job.batch_size:
        print(f"altclip-fast: resuming with the interrupted run's --batch-size {plan['batch_size']}", file=sys.stderr)
    if changed:
        shown = ", ".join(inputs.items[i] for i in changed[:5]) + (", ..." if len(changed) > 5 else "")
        print(f"altclip-fast: {len(changed)} input files changed (size or modification time) since the interrupted "
              f"run; their batches are computed again: {shown}", file=sys.stderr)
        for k in sorted({i // plan["batch_size"] for i in changed}):
            _remove(files.partial.batch_file(k))
    for s in inputs.skipped:
        if "path" in s:
            print(f"altclip-fast: skipped {s['path']}: {s['reason']}", file=sys.stderr)
    embed_run = _Run(job, inputs, files, session, plan)
    seconds = embed_run.compute(workers)
    return embed_run.finish(seconds)


def _check_out(job: EmbedJob, files: OutputFiles) -> None:
    if files.out.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out {job.out}: the output must end in .npy or .safetensors")
    if files.out.is_dir():
        raise UsageError(f"--out {job.out} is a directory; give a file name ending in .npy or .safetensors")
    if not files.out.parent.is_dir():
        raise UsageError(f"--out {job.out}: the folder {files.out.parent} does not exist")


@contextmanager
def exclusive_output(files) -> Iterator[None]:
    """The output location checked writable (a probe file, before any model loads), then held by
    this run alone (``_take_lock``) until the block ends. ``files``: ``out`` and ``lock`` paths."""
    _probe_writable(files)
    lock = _take_lock(files)
    try:
        yield
    finally:
        _release_lock(files, lock)


def _probe_writable(files: OutputFiles) -> None:
    """Write and remove a small file next to the output, before the model is loaded."""
    probe = files.out.with_name(f".{files.out.name}.probe-{os.getpid()}")
    created = False
    try:
        with open(probe, "wb") as f:
            created = True
            f.write(b"probe")
    except OSError as exc:
        if exc.errno in _DISK_FULL:  # a failure of the machine, not of the command line: status 1
            raise write_error(files.out.parent, exc, "run again") from None
        raise UsageError(f"--out {files.out}: cannot write in the folder {files.out.parent}: "
                         f"{exc.strerror or exc}") from None
    finally:
        if created:  # on a read-only file system even removing a file that is not there fails
            _remove(probe)


def _take_lock(files: OutputFiles):
    """An exclusive ``flock`` on ``.<out>.lock``: one run per output at a time (None without fcntl)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return None
    while True:
        try:
            fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"--out {files.out}: cannot create {files.lock}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip()
            os.close(fd)
            raise UsageError(
                f"another altclip-fast embed{f' (pid {holder})' if holder else ''} is writing {files.out} "
                f"(it holds {files.lock}): wait for it to finish, or choose another --out"
            ) from None
        try:
            current = os.stat(files.lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:  # else the run we waited on removed it: take the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _release_lock(files: OutputFiles, fd) -> None:
    if fd is None:
        return
    _remove(files.lock)
    os.close(fd)


def _already_complete(job: EmbedJob, files: OutputFiles) -> bool:
    """Check the output options against what is on disk. True: ``--resume`` of a finished output."""
    partial = files.partial.directory
    if files.out.exists() and not job.overwrite:
        if job.resume and not partial.exists():
            problem = published_mismatch(files.out)
            if problem:
                raise UsageError(f"{files.out} exists but {problem}: pass --overwrite to recompute it")
            return True
        if not job.resume:
            if partial.exists():
                raise UsageError(
                    f"{files.out} exists, and an interrupted run of it is saved in {partial}: pass --resume to "
                    "finish that run (it replaces the output), or --overwrite to start over"
                )
            raise UsageError(f"{files.out} exists: pass --overwrite to replace it")
        # else: an interrupted --overwrite run of this output; resuming it replaces the output at the end.
    if partial.exists() and not (job.resume or job.overwrite):
        raise UsageError(
            f"an interrupted run of this output is in {partial}: pass --resume to continue it "
            "or --overwrite to start over"
        )
    return False


def _plan(job: EmbedJob, inputs: Inputs, session) -> dict:
    """What the run computes: a resumed run must compute the same (the batch size may differ).
    Images are identified by resolved path, so that the way they were typed does not matter."""
    if inputs.kind == "image":
        identity = "\n".join(inputs.keys)
    else:
        identity = "\n".join(json.dumps(r, ensure_ascii=False) for r in inputs.rows)
    return {
        "version": PLAN_VERSION,
        "kind": inputs.kind,
        "count": len(inputs.items),
        "inputs_sha256": hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest(),
        "model": str(session.model_dir.resolve()),
        "dtype": str(session.dtype).removeprefix("torch."),
        "normalize": bool(job.normalize),
        "exif_transpose": job.exif_transpose,
        "fast_decode": bool(job.fast_decode),
        "image_size": getattr(session, "image_size", None),
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
                faults.after_batch(written)
        except KeyboardInterrupt:
            saved = len(self.batches) - len(self.pending) + written
            # --resume continues this run whether or not it was started with --overwrite.
            raise Interrupted(f"{saved} of {len(self.batches)} batches are saved: "
                              "rerun the same command with --resume to finish") from None
        finally:
            bar.close()
        return time.perf_counter() - started

    def finish(self, seconds: float) -> int:
        """The output and its metadata from the batch files, published metadata last; then the
        partial directory goes."""
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
        then = (f"rerun the same command with --resume (all {len(self.batches)} batches are kept in "
                f"{files.partial.directory})")
        # Batch by batch, so that the output never has to fit in memory at once.
        parts = (files.partial.read_embeddings(k) for k, size in enumerate(sizes) if size)
        data_tmp = files.temp(files.out)
        with _Writing(files.out, data_tmp, then) as f:
            if files.out.suffix == ".npy":
                nbytes, digest = _write_npy(f, parts, embedded, dim)
            else:
                nbytes, digest = _write_safetensors(f, parts, embedded, dim, {k: str(v) for k, v in info.items()})
        meta_tmp = files.temp(files.meta)
        try:
            self._write_meta(_Writing(files.meta, meta_tmp, then), info, nbytes, digest, rows, skipped)
        except BaseException:
            _remove(data_tmp)
            raise
        # Publish: no old metadata may stand next to the new output, and the new metadata, renamed
        # last, is the mark of a finished run. Until the partial directory goes, --resume redoes this.
        _remove(files.meta)
        _replace(data_tmp, files.out, then)
        faults.before_meta()
        _replace(meta_tmp, files.meta, then)
        shutil.rmtree(files.partial.directory)
        print(self._summary(embedded, skipped, seconds))
        return 0

    def _write_meta(self, writing: _Writing, info: dict, nbytes: int, digest: str, rows: list[dict],
                    skipped: list[dict]) -> None:
        with writing as f:
            f.write(json.dumps({
                **info,
                "output": self.files.out.name,
                "output_bytes": nbytes,
                "output_sha256": digest,
                "rows": [{"row": r, **row} for r, row in enumerate(rows)],
                "skipped": [{k: v for k, v in s.items() if k != "category"} for s in skipped],
            }, ensure_ascii=False, indent=1).encode("utf-8"))

    def _collect(self) -> tuple[list[dict], list[dict], list[int]]:
        """The metadata rows of the embedded inputs in output order, the skipped inputs (with a
        ``category`` for the summary), and the number of rows per batch file."""
        rows = []
        skipped = [{**s, "category": s.get("category", s["reason"])} for s in self.inputs.skipped]
        sizes = []
        for k in range(len(self.batches)):
            indices, skipped_idx, reasons = self.files.partial.read_index(k)
            sizes.append(len(indices))
            rows.extend(self.inputs.rows[i] for i in indices.tolist())
            for i, reason in zip(skipped_idx.tolist(), reasons):
                skipped.append({**self.inputs.rows[i], "reason": reason, "category": "unreadable"})
        return rows, skipped, sizes

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


class _Hashing:
    """Writes to ``f`` and counts and hashes what it wrote."""

    def __init__(self, f):
        self.f, self.nbytes, self.sha = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.nbytes += len(data)
        self.sha.update(data)


def _write_npy(f, parts, rows: int, dim: int) -> tuple[int, str]:
    """The ``.npy`` format written with plain writes (no memory map: see the module doc)."""
    out = _Hashing(f)
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
    header_bytes = _npy_header(header)
    _reserve(f, len(header_bytes) + rows * dim * 4)
    out.write(header_bytes)
    row = 0
    for part in parts:
        out.write(np.ascontiguousarray(part, dtype="<f4").tobytes())
        row += len(part)
    if row != rows:
        raise AltCLIPError(f"internal error: batch files hold {row} rows, the index {rows}")
    return out.nbytes, out.sha.hexdigest()


def _npy_header(header: dict) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _write_safetensors(f, parts, rows: int, dim: int, metadata: dict[str, str]) -> tuple[int, str]:
    """One F32 tensor "embeddings" in the safetensors layout: u64 header size, JSON header padded
    to 8 bytes, little-endian data."""
    nbytes = rows * dim * 4
    header = {"__metadata__": metadata, "embeddings": {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, nbytes]}}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    out = _Hashing(f)
    _reserve(f, 8 + len(raw) + nbytes)
    out.write(len(raw).to_bytes(8, "little"))
    out.write(raw)
    written = 0
    for part in parts:
        data = np.ascontiguousarray(part, dtype="<f4").tobytes()
        out.write(data)
        written += len(data)
    if written != nbytes:
        raise AltCLIPError(f"internal error: batch files hold {written} bytes of embeddings, expected {nbytes}")
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
    files = OutputFiles.of(str(out))
    if not files.meta.is_file():
        return f"its metadata file {files.meta} is missing"
    try:
        meta = json.loads(files.meta.read_text(encoding="utf-8"))
        rows = _output_rows(files.out)
    except (OSError, ValueError, KeyError) as exc:
        return f"it or its metadata cannot be read ({exc})"
    if meta.get("output") != files.out.name or meta.get("count") != rows or len(meta.get("rows", ())) != rows:
        return f"its metadata {files.meta} describes another output ({meta.get('count')} rows, the file has {rows})"
    if "output_bytes" in meta and meta["output_bytes"] != files.out.stat().st_size:
        return f"its metadata {files.meta} describes another output (size differs)"
    if verify and "output_sha256" in meta:
        sha = hashlib.sha256()
        with open(files.out, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        if sha.hexdigest() != meta["output_sha256"]:
            return f"its content does not match the sha256 in {files.meta}"
    return None


def load_embeddings(out: str | Path, *, verify: bool = False) -> tuple[np.ndarray, dict]:
    """An ``embed`` output and its metadata, checked to belong to the same finished run."""
    problem = published_mismatch(out, verify=verify)
    if problem:
        raise AltCLIPError(f"{out}: {problem}")
    files = OutputFiles.of(str(out))
    meta = json.loads(files.meta.read_text(encoding="utf-8"))
    if files.out.suffix == ".npy":
        return np.load(files.out), meta
    from safetensors.numpy import load_file

    return load_file(str(files.out))["embeddings"], meta
