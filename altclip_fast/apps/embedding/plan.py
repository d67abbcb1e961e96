"""The plan of a run and the resume policy, one for both writers.

A run in progress keeps its state in a directory (``.<out>.partial/`` for one file,
``DIR/.altclip-fast/`` for shards): ``plan.json``, what the run computes (a digest of the listing,
the model, dtypes, normalisation and the writer's settings), ``inputs.json``, the size and mtime of
every file read, and the parts (``parts``).

Resume policy (``--resume``):

- the listing (the inputs, by name, in order) must be the same; otherwise the run is refused;
- inputs whose file changed since (size or mtime) are computed again: the caller drops their parts
  and, for shards, rewrites the finished shards that hold them;
- any other setting that differs is refused;
- with ``--overwrite`` too, a run that cannot be resumed is started over, with a message.

State saved by an older altclip-fast (a single-file run's ``batch-*.npz`` and plan version 2, an
``--out-dir`` plan version 1) is never read as this format: it is refused with one line that says
what to do.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from ...errors import UsageError
from . import files
from .inputs import Listing

# 4: image_path is absolute and the plan records input_root. A version-3 run's saved parts hold paths
# as typed, which a resumed run would mix with absolute ones in one shard, so it is refused as older.
PLAN_VERSION = 4
_IDENTITY = ("listing_sha256", "count")  # compared as the listing, not as settings
# Recorded, not compared: the same files named through another path (a linked folder) resume fine.
_RECORDED = ("input_root",)


def make_plan(listing: Listing, writer: str, settings: dict) -> dict:
    """``writer``: "file" or "shards"; ``settings``: everything else a resumed run must share."""
    digest = hashlib.sha256("\n".join(listing.identity).encode("utf-8", "surrogateescape")).hexdigest()
    return {"version": PLAN_VERSION, "writer": writer, "modality": listing.modality, "source": listing.source,
            "count": len(listing.items), "listing_sha256": digest, "input_root": listing.root, **settings}


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _older_format(state: Path, old) -> str | None:
    """Why ``state`` holds a run of an older altclip-fast, in words; None when it does not."""
    if any(state.glob("batch-*.npz")):
        return "its batch-*.npz files"
    if isinstance(old, dict) and old.get("version") != PLAN_VERSION:
        return f"plan version {old.get('version')}"
    return None


def _older_line(where, older: str) -> str:
    return f"{where} holds a run saved by an older altclip-fast ({older})"


def check_format(state: Path, where, *, overwrite: bool) -> None:
    """Refuse, before anything loads, a run saved by an older altclip-fast (unless --overwrite)."""
    if overwrite or not state.is_dir():
        return
    plan_file = state / "plan.json"
    older = _older_format(state, _read(plan_file) if plan_file.is_file() else None)
    if older:
        raise UsageError(f"{_older_line(where, older)}: finish it with the altclip-fast version that started it, "
                         "or pass --overwrite to start over")


def resume_state(state: Path, plan: dict, listing: Listing, *, resume: bool, overwrite: bool,
                 where: str) -> list[int] | None:
    """Check the run saved in ``state`` against this one. Returns the inputs changed since it saved
    them (to compute again) when it is resumed, None when the run starts afresh (``create``)."""
    plan_file = state / "plan.json"
    old = _read(plan_file) if plan_file.is_file() else None
    older = _older_format(state, old) if state.is_dir() else None
    if older:
        check_format(state, where, overwrite=overwrite)
        print(f"altclip-fast: {_older_line(where, older)}; starting over (--overwrite)", file=sys.stderr)
        return None
    if not (resume and plan_file.is_file()):
        return None
    if old is None:
        problem = f"its plan {plan_file} cannot be read; pass --overwrite to start over"
    else:
        problem = _mismatch(state, old, plan, listing)
        if problem is None:
            before = _read(state / "inputs.json") or {}
            try:
                return listing.changed_since(before["files"], before["stats"])
            except (KeyError, TypeError):
                return list(range(len(listing.items)))  # nothing to compare with: trust no part
    if not overwrite:
        raise UsageError(f"cannot resume the interrupted run in {where}: {problem}")
    print(f"altclip-fast: the interrupted run in {where} cannot be resumed ({problem}); starting over (--overwrite)",
          file=sys.stderr)
    return None


def _mismatch(state: Path, old: dict, plan: dict, listing: Listing) -> str | None:
    """Why the saved run cannot be continued by this one, in words; None if it can."""
    differ = [k for k in plan if k not in _IDENTITY + _RECORDED and old.get(k) != plan[k]]
    if differ:
        details = ", ".join(f"{k}: {old.get(k)!r} then, {plan[k]!r} now" for k in differ)
        return f"it computed something else ({details}); rerun with its options or pass --overwrite to start over"
    if all(old.get(k) == plan[k] for k in _IDENTITY):
        return None
    if listing.source == "captions":
        return ("the captions are not those of the interrupted run; "
                "rerun with the same caption file or pass --overwrite to start over")
    before = _read(state / "inputs.json") or {}
    old_files = set(before.get("files") or ())
    new, gone = sorted(set(listing.files) - old_files), sorted(old_files - set(listing.files))
    parts = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in ((new, "new"), (gone, "no longer found")) if v]
    return (f"the input files are not those of the interrupted run ({', '.join(parts) or 'another list'}); "
            "rerun with the same inputs or pass --overwrite to start over")


def create(state: Path, plan: dict, listing: Listing) -> None:
    """A fresh state directory: what was there goes; the plan is written last (a directory without a
    plan is no run to resume)."""
    if state.exists():
        shutil.rmtree(state)
    try:
        state.mkdir(parents=True)
    except OSError as exc:
        raise files.write_error(state, exc, "run again") from None
    try:
        record_files(state, listing, "run again")
        files.write_json(state / "plan.json", plan, "run again")
    except BaseException:
        shutil.rmtree(state, ignore_errors=True)
        raise


def record_files(state: Path, listing: Listing, then: str = files.RESUME_HINT) -> None:
    """The size and mtime of every file the inputs are read from, as this run reads them."""
    files.write_json(state / "inputs.json", {"files": listing.files, "stats": listing.stats}, then)
