"""``altclip-fast embed``: check options -> lock -> list inputs -> session -> plan/resume -> engine ->
writer, for both writers (one ``.npy``/``.safetensors`` file, or clip-retrieval shards) and both
engines (local, Ray)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

from ...errors import UsageError
from . import files, local_engine, plan, shards, single_file
from .inputs import Listing, list_inputs
from .job import EmbedJob, Work
from .parts import drop_parts, saved_inputs


def run(job: EmbedJob, open_session: Callable[[], object]) -> int:
    """Embed ``job.input``. ``open_session()`` gives the model, processor, device and dtype (an
    ``apps.runtime.Session``); it is called once the job's options and inputs are checked."""
    workers = local_engine.default_workers() if job.workers is None else job.workers
    if workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}")
    if job.out is not None:
        out = single_file.OutputFiles.of(job.out)
        single_file.check_out(job, out)
        with files.exclusive_output(out.out, out.lock):
            return _single_file(job, out, open_session, workers)
    root = shards.check_out_dir(job)
    root.mkdir(exist_ok=True)
    with files.exclusive_output(root / "skipped.parquet", root / ".altclip-fast.lock"):
        return _sharded(job, root, open_session, workers)


def _settings(job: EmbedJob, session) -> dict:
    """What a resumed run must share with the interrupted one, besides its listing."""
    return {"model": str(session.model_dir.resolve()), "dtype": session.dtype_name, "normalize": bool(job.normalize),
            "exif_transpose": job.exif_transpose, "fast_decode": bool(job.fast_decode),
            "image_size": session.image_size}


def _start(job: EmbedJob, state: Path, the_plan: dict, listing: Listing, where: str,
           fresh: Callable[[], None]) -> list[int]:
    """The resume policy: the inputs changed since the saved run (to compute again), or a fresh state
    (``fresh()`` clears what the writer had written) and none."""
    changed = plan.resume_state(state, the_plan, listing, resume=job.resume, overwrite=job.overwrite, where=where)
    if changed is not None:
        return changed
    fresh()
    plan.create(state, the_plan, listing)
    return []


def _recompute(state: Path, listing: Listing, changed: list[int], shard_size: int) -> set[int]:
    """Drop the parts that hold changed inputs; returns the shards they belong to."""
    names = list(dict.fromkeys(listing.skip_path(i) for i in changed))
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    print(f"altclip-fast: {len(names)} input files changed (size or modification time) since the interrupted "
          f"run; their batches are computed again: {shown}", file=sys.stderr)
    by_shard: dict[int, set[int]] = {}
    for i in changed:
        by_shard.setdefault(i // shard_size, set()).add(i)
    for k, inputs in by_shard.items():
        drop_parts(state, k, inputs)
    plan.record_files(state, listing)
    return set(by_shard)


def _work(job: EmbedJob, listing: Listing, ranges: list[range], pending: list[int], state: Path) -> Work:
    return Work(listing, ranges, pending, saved_inputs(state, pending), state, job.batch_size, job.normalize,
                job.progress)


def _single_file(job: EmbedJob, out: single_file.OutputFiles, open_session, workers: int) -> int:
    plan.check_format(out.state, out.state, overwrite=job.overwrite)
    if single_file.already_complete(job, out):
        print(f"{out.out} is already complete; nothing to resume (pass --overwrite to recompute it)")
        return 0
    listing = list_inputs(job.input, webdataset=False)
    # Leftovers of a run killed while writing the output (we hold the lock: nobody else writes them).
    for stale in (files.temp(out.out), files.temp(out.meta)):
        files.remove(stale)
    session = open_session()
    the_plan = plan.make_plan(listing, "file", _settings(job, session))
    changed = _start(job, out.state, the_plan, listing, str(out.state), lambda: None)
    ranges = [range(len(listing.items))]
    if changed:
        _recompute(out.state, listing, changed, len(listing.items))
    writer = single_file.SingleFileWriter(listing)
    for line in writer.listing_lines():
        print(line, file=sys.stderr)
    work = _work(job, listing, ranges, [0], Path(os.path.abspath(out.state)))
    if job.engine != "ray":
        session.model  # loaded before the line that says what it runs on
        print(f"altclip-fast: embedding with {session.describe()}", file=sys.stderr)
    seconds = _compute(job, work, session, writer, workers)
    return single_file.publish(job, out, work, session, seconds)


def _sharded(job: EmbedJob, root: Path, open_session, workers: int) -> int:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UsageError("--out-dir writes parquet metadata: pip install 'altclip-fast[collection]'") from None
    state = root / shards.STATE
    plan.check_format(state, job.out_dir, overwrite=job.overwrite)
    listing = list_inputs(job.input, with_text=job.with_text)
    ranges = shards.shard_ranges(len(listing.items), job.shard_size)
    paths = shards.ShardPaths(root, len(str(max(0, len(ranges) - 1))))
    session = open_session()
    settings = {**_settings(job, session), "emb_dtype": job.emb_dtype, "with_text": bool(job.with_text),
                "shard_size": job.shard_size}
    the_plan = plan.make_plan(listing, "shards", settings)
    changed = _start(job, state, the_plan, listing, job.out_dir, lambda: shards.start_fresh(job, paths))
    if changed:
        for k in _recompute(state, listing, changed, job.shard_size):
            shards.reopen(paths, k)
    if job.resume and paths.skipped.is_file() and all(shards.read_marker(paths, k) for k in range(len(ranges))):
        print(f"{root} is already complete; nothing to resume (pass --overwrite to recompute it)")
        return 0
    shards.report_listing(listing)
    # Ray's workers do not share the driver's working directory: the writer is given absolute paths.
    absolute = shards.ShardPaths(Path(os.path.abspath(root)), paths.width)
    writer = shards.ShardWriter(absolute, shards.column_types(listing.rows), job.emb_dtype, listing.modality)
    pending = [k for k in range(len(ranges)) if shards.read_marker(paths, k) is None]
    work = _work(job, listing, ranges, pending, absolute.state)
    return shards.finish(listing, paths, work, _compute(job, work, session, writer, workers))


def _compute(job: EmbedJob, work: Work, session, writer, workers: int) -> float:
    """The job's engine over ``work``, handing parts and shards to ``writer``; returns the seconds
    it took. Any engine runs with any writer (the command line offers Ray with --out-dir only)."""
    if not work.pending:
        return 0.0
    if job.engine == "ray":  # its actors load their own copies; the driver never runs the model
        from . import ray_engine

        started = time.perf_counter()
        ray_engine.compute(work, session, writer, job)
    else:
        session.model  # loaded before the clock starts, so that the rate shown is the embedding rate
        started = time.perf_counter()
        local_engine.compute(work, session, writer, workers)
    return time.perf_counter() - started
