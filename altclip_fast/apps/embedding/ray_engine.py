"""``--engine ray``: the local engine's parts and shards, computed by Ray Data.

Pipeline: the pending shards' inputs (listed by the driver, which keys ``--resume`` on them) ->
decoding and resizing as CPU tasks (for webdataset, one task per tar, which reads the wanted
members and decodes them) -> the model in an actor pool (``map_batches`` with a callable class,
``--ray-workers`` actors; with ``--with-text`` it embeds each sample's caption too), each batch
saved by its actor as per-shard part files (``parts.save_part``, the local engine's format) ->
one Ray task per shard that hands its parts to the writer (``Writer.assemble``, which puts them
back into listing order and writes the shard). So the driver never holds image bytes or embeddings,
and the files are
the local engine's. (A ``groupby(shard)`` would do the same through Ray's hash shuffle,
whose aggregator actors a 2-CPU machine cannot fit next to the model actors.) Actors are restarted
and their tasks retried when one dies (``max_restarts``/``max_task_retries``); a retried batch
rewrites its part files, and a shard takes each input once. ``--resume`` after a killed driver keeps
the part files saved so far (by either engine) and embeds only the inputs they do not cover. DIR must
be on storage every node sees.

``embed_dataset(ds, model, column=...)`` is the Python API for an existing Ray pipeline.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from ...errors import UsageError
from .. import faults
from ..runtime import Session, SessionSettings, load_processor, resolve_model
from . import encode
from .decode import decode_columns
from .inputs import Listing, tar_images
from .job import EmbedJob, Work, Writer
from .parts import save_part


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--engine ray needs Ray Data: pip install 'altclip-fast[ray]'") from None
    return ray


def _ensure_ray(address: str | None):
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    return ray


class Embedder:
    """The actor (``modality`` "image" or "text"): a batch of uint8 crops (``crop``, ``ok``) or captions (``text``) -> ``embedding``."""

    def __init__(self, settings: SessionSettings, modality: str, normalize: bool, kill_marker: str | None = None,
                 text_column: str | None = None):
        self.session = Session.from_settings(settings)
        self.modality, self.normalize, self.kill_marker, self.text_column = modality, normalize, kill_marker, text_column

    def __call__(self, batch: dict) -> dict:
        import torch

        faults.kill_actor_once(self.kill_marker)
        s = self.session
        dim = s.model.config.projection_dim
        n = len(batch["idx"])
        if self.modality == "image":
            ok = np.asarray(batch["ok"], dtype=bool)
            out = np.zeros((n, dim), np.float32)
            if ok.any():
                crops = torch.from_numpy(np.ascontiguousarray(np.stack(list(batch["crop"][ok]))))
                out[ok] = encode.encode(s, "image", crops, self.normalize)
            batch = {k: v for k, v in batch.items() if k != "crop"}
        else:
            enc = s.processor.tokenizer([str(t) for t in batch["text"]])
            out = encode.encode(s, "text", enc, self.normalize)
            batch = dict(batch, ok=np.ones(n, dtype=bool))
        batch["embedding"] = out
        if self.text_column:
            enc = s.processor.tokenizer([str(t) for t in batch[self.text_column]])
            batch["text_embedding"] = encode.encode(s, "text", enc, self.normalize)
        return batch


def _decoder(image_processor):
    """A batch's ``path`` (image files) or ``data`` (encoded images) -> ``crop``, ``ok``, ``reason``,
    through the one ``decode``, so that crops and reasons are the local engine's."""

    def decode(batch: dict) -> dict:
        sources = batch["data"] if "data" in batch else batch["path"]
        out = {k: v for k, v in batch.items() if k not in ("path", "data")}
        out.update(decode_columns(image_processor, sources))
        return out

    return decode


def _columns(records: list[dict]) -> dict:
    # object arrays: numpy's fixed-width bytes and str types drop trailing NULs, which images have
    return {k: np.asarray([r[k] for r in records], dtype=None if k in ("idx", "shard") else object)
            for k in records[0]}


def _tar_reader(decode, batch_size: int):
    """A read unit (one tar and its wanted records, as JSON) -> those records decoded, in batches:
    each member's bytes are read and decoded where the task runs, never on the driver."""

    def read(units: dict):
        for tar, records in zip(units["tar"], units["records"]):
            records = {r["idx"]: r for r in json.loads(records)}
            batch = []
            for i, data in tar_images(str(tar), {r["key"]: i for i, r in records.items()}):
                batch.append(dict(records[i], data=data))
                if len(batch) == batch_size:
                    yield decode(_columns(batch))
                    batch = []
            if batch:
                yield decode(_columns(batch))

    return read


class _ShardEmbedder(Embedder):
    """The engine's actor: embeds a batch, then saves each shard's slice of it as a part (``parts``)
    under ``state``, and returns only counts, so that the embeddings never travel to the driver. A
    retried batch rewrites its parts."""

    def __init__(self, settings: SessionSettings, modality: str, normalize: bool, state: str,
                 kill_marker: str | None = None, text_column: str | None = None):
        super().__init__(settings, modality, normalize, kill_marker, text_column)
        self.state = state

    def __call__(self, batch: dict) -> dict:
        batch = super().__call__(batch)
        shards = np.asarray(batch["shard"])
        idx = np.asarray(batch["idx"])
        ok = np.asarray(batch["ok"], dtype=bool)
        reasons = np.asarray([str(r) for r in batch["reason"]] if "reason" in batch else [""] * len(idx), dtype=str)
        metas = np.asarray([str(m) for m in batch["meta"]], dtype=str)
        where = np.asarray([str(p) for p in batch["skip_path"]], dtype=str)
        embeddings = [name for name in ("embedding", "text_embedding") if name in batch]
        counts = []
        for k in np.unique(shards):
            sel = shards == k
            part = {"idx": idx[sel], "ok": ok[sel], "reason": reasons[sel], "meta": metas[sel], "skip_path": where[sel],
                    **{name: np.asarray(batch[name])[sel] for name in embeddings}}
            save_part(self.state, int(k), part)
            counts.append((int(k), int(sel.sum())))
        return {"shard": np.asarray([c[0] for c in counts], dtype=np.int64),
                "rows": np.asarray([c[1] for c in counts], dtype=np.int64)}


def _assemble(writer: Writer, k: int, start: int, stop: int) -> list[dict]:
    """A Ray task: shard ``k``'s parts -> the writer's files; returns its skipped inputs."""
    return writer.assemble(k, range(start, stop))


def _records(work: Work) -> list[dict]:
    """One per unsaved input of the pending shards: where it goes (``idx``, ``shard``), its metadata,
    how skipped.parquet names it, and how a worker reads it (``path``, ``tar`` and ``key``, or
    ``text``); with --with-text, its caption in ``text``."""
    listing: Listing = work.listing
    records = []
    for k in work.pending:
        for i in work.todo(k):
            record = {"idx": i, "shard": k, "meta": json.dumps(listing.rows[i], ensure_ascii=False),
                      "skip_path": listing.skip_path(i)}
            if listing.source == "webdataset":
                t, record["key"] = listing.items[i]
                record["tar"] = os.path.abspath(listing.tars[t])
            elif listing.modality == "image":
                record["path"] = os.path.abspath(listing.items[i])
            else:
                record["text"] = listing.items[i]
            if listing.texts is not None:
                record["text"] = listing.texts[i]
            records.append(record)
    return records


def _read_units(records: list[dict]) -> list[dict]:
    """Webdataset records -> one read unit per tar, so that each tar is read once, by one task."""
    by_tar: dict[str, list[dict]] = {}
    for record in records:
        by_tar.setdefault(record.pop("tar"), []).append(record)
    return [{"tar": tar, "records": json.dumps(rs, ensure_ascii=False)} for tar, rs in by_tar.items()]


def actor_cpus(cluster_cpus: float, node_cpus: float, workers: int, gpus: float, requested: float | None) -> float:
    """CPUs to reserve per model actor. A GPU actor needs one to feed its GPU. CPU actors share the
    cluster's CPUs but one, which the decoding tasks keep (or every core would be held by an actor
    waiting for decoded batches), whole CPUs where the share is at least one (torch runs that many
    threads), and never more than one node has (or the actor could not be placed)."""
    if requested is not None:
        return requested
    if gpus:
        return 1.0
    share = min((cluster_cpus - 1) / workers, node_cpus)
    return float(math.floor(share)) if share >= 1 else max(0.1, share)


def _largest_node_cpus(ray) -> float:
    return max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1.0)


def _embed_records(ray, job: EmbedJob, work: Work, session, records: list[dict], gpus: float, cpus: float) -> None:
    """Decode and embed ``records`` in Ray Data; the actors save each batch as parts."""
    listing = work.listing
    settings = session.settings(device="auto" if gpus else "cpu", threads=max(1, int(cpus)))
    decode = _decoder(session.processor.image_processor)
    if listing.source == "webdataset":
        # The task that reads a tar decodes it too: the bytes never enter the object store. (A decode
        # step of its own would be fused into the read anyway, with batch_size tars to one task.)
        units = _read_units(records)
        ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            _tar_reader(decode, work.batch_size), batch_size=1, batch_format="numpy")
    else:
        ds = ray.data.from_items(records)
        if listing.modality == "image":
            ds = ds.map_batches(decode, batch_size=work.batch_size, batch_format="numpy")
    # Ray Data's actor pools restart dead actors and retry their batches (max_restarts and
    # max_task_retries default to -1 there).
    ds = ds.map_batches(
        _ShardEmbedder, fn_constructor_kwargs={"settings": settings, "modality": listing.modality, "normalize": work.normalize,
                                               "state": str(work.state), "kill_marker": faults.actor_kill_marker(),
                                               "text_column": "text" if listing.texts is not None else None},
        compute=ray.data.ActorPoolStrategy(size=job.ray_workers), num_gpus=gpus, num_cpus=cpus,
        batch_size=work.batch_size, batch_format="numpy",
    )
    done = sorted({int(r["shard"]) for r in ds.take_all()})  # counts only: the driver holds no embeddings
    expected = sorted({int(r["shard"]) for r in records})
    if done != expected:
        raise RuntimeError(f"Ray embedded shards {done}, expected {expected}")


def compute(work: Work, session, writer: Writer, job: EmbedJob) -> None:
    """The local engine's ``compute``, on Ray. ``work.state`` must be an absolute path on storage every
    node sees (Ray's workers do not share the driver's working directory)."""
    ray = _ensure_ray(job.ray_address)
    resources = ray.cluster_resources()
    gpus = job.ray_gpus_per_worker
    if gpus is None:
        gpus = 1 if resources.get("GPU", 0) else 0
    cpus = actor_cpus(resources.get("CPU", 1), _largest_node_cpus(ray), job.ray_workers, gpus, job.ray_cpus_per_worker)
    records = _records(work)
    if records:
        _embed_records(ray, job, work, session, records, gpus, cpus)
    assemble = ray.remote(num_cpus=min(1.0, resources.get("CPU", 1)), max_retries=3)(_assemble)
    queued = [(writer, k, work.shards[k].start, work.shards[k].stop) for k in work.pending]
    # Every shard is assembled at once, except under the tests' driver-kill fault: there one at a time, so
    # that exactly that many shards are written when the driver dies (tasks in flight would outlive it).
    in_flight = 1 if faults.kills_after_shards() else len(queued)
    waiting = [assemble.remote(*args) for args in queued[:in_flight]]
    queued = queued[in_flight:]
    written = 0
    while waiting:
        done_refs, waiting = ray.wait(waiting, num_returns=1)
        for skip in ray.get(done_refs[0]):  # reported as the local engine does, a shard at a time
            print(writer.skipped_line(skip), file=sys.stderr)
        written += 1
        faults.after_shard(written)
        if queued:
            waiting.append(assemble.remote(*queued.pop(0)))


def embed_dataset(ds, model: str, *, column: str = "image", kind: str | None = None, batch_size: int = 32,
                  workers: int = 1, gpus_per_worker: float | None = None, cpus_per_worker: float | None = None,
                  normalize: bool = True, dtype: str | None = None):
    """A Ray Dataset with an ``image`` column (paths or encoded bytes) or a text column -> the same
    with an ``embedding`` column (float32; rows that cannot be decoded get zeros and ``ok=False``).
    ``cpus_per_worker``: as ``actor_cpus`` picks by default."""
    ray = _ray()
    model_dir = resolve_model(model)
    kind = kind or ("image" if column == "image" else "text")
    if gpus_per_worker is None:
        gpus_per_worker = 1 if ray.cluster_resources().get("GPU", 0) else 0
    cpus = actor_cpus(ray.cluster_resources().get("CPU", 1), _largest_node_cpus(ray), workers, gpus_per_worker,
                      cpus_per_worker)
    # "auto": each actor decides for the device it lands on (bf16 only where the GPU computes in it).
    settings = SessionSettings(str(model_dir), "auto" if gpus_per_worker else "cpu", dtype or "auto",
                               threads=max(1, int(cpus)))
    if kind == "image":
        ip = load_processor(model_dir).image_processor
        decode = _decoder(ip)

        def prepare(batch: dict) -> dict:
            values = batch[column]
            encoded = len(values) and isinstance(values[0], (bytes, bytearray))
            return {**batch, **decode({"data" if encoded else "path": values})}

        ds = ds.map_batches(prepare, batch_size=batch_size, batch_format="numpy")
    else:
        ds = ds.map_batches(lambda b: {**b, "text": b[column]}, batch_size=batch_size, batch_format="numpy")
    ds = ds.map_batches(lambda b: {**b, "idx": np.arange(len(next(iter(b.values()))))}, batch_format="numpy")
    return ds.map_batches(
        Embedder, fn_constructor_kwargs={"settings": settings, "modality": kind, "normalize": normalize},
        compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=gpus_per_worker, num_cpus=cpus,
        batch_size=batch_size, batch_format="numpy",
    ).map_batches(lambda b: {k: v for k, v in b.items() if k not in ("idx", "crop")}, batch_format="numpy")
