"""The local engine: decoding in worker processes (DataLoader workers for image files, a process pool
for webdataset members, ``--workers``), the model in this process, each batch saved as a part, each
shard handed to the writer as soon as its parts are all saved."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import numpy as np

from .. import faults
from . import encode
from .decode import ImageFiles, collate_crops, decode_job
from .inputs import Listing, webdataset_bytes
from .job import Interrupted, Work, Writer
from .parts import make_part, save_part


def default_workers() -> int:
    """One worker per spare core (up to 16): on a GPU, decoding and resizing camera-sized photos is
    slower than the model, so every core helps (rates per core: bench/bench_preprocess.py, bench/RESULTS.md)."""
    return max(0, min(16, (os.cpu_count() or 1) - 1))


def _file_batches(listing: Listing, batches: list[list[int]], session, workers: int) -> Iterator[tuple]:
    from torch.utils.data import DataLoader

    loader = DataLoader(ImageFiles(listing.items, session.processor.image_processor), batch_sampler=batches,
                        num_workers=workers, collate_fn=collate_crops)
    yield from loader


def _member_batches(listing: Listing, batches: list[list[int]], session, workers: int) -> Iterator[tuple]:
    ip = session.processor.image_processor
    pool = None
    if workers > 0:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers)
    try:
        stream = webdataset_bytes(listing, {i for b in batches for i in b})
        for batch in batches:
            got = [next(stream) for _ in batch]
            jobs = [(ip, data) for _, data in got]
            results = list(pool.map(decode_job, jobs)) if pool else [decode_job(j) for j in jobs]
            yield collate_crops([(i, crop, reason) for (i, _), (crop, reason) in zip(got, results)])
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def batches_of(listing: Listing, batches: list[list[int]], session, workers: int) -> Iterator[tuple]:
    """``(indices, payload or None, skipped, reasons)`` per batch, in order: uint8 crops (a torch
    tensor) for images, the tokenizer's output for captions."""
    if listing.modality == "text":
        tokenizer = session.processor.tokenizer
        yield from ((b, tokenizer([listing.items[i] for i in b]), [], []) for b in batches)
        return
    import torch

    source = _file_batches if listing.source == "files" else _member_batches
    for indices, crops, skipped, reasons in source(listing, batches, session, workers):
        yield indices, None if crops is None else torch.from_numpy(crops), skipped, reasons


def _part(work: Work, session, result) -> dict:
    """One batch's results -> its part, inputs in listing order."""
    listing = work.listing
    indices, payload, bad, reasons = result
    dim = session.model.config.projection_dim
    why = dict(zip(bad, reasons))
    idx = sorted([*indices, *bad])
    ok = np.asarray([i not in why for i in idx], dtype=bool)
    embedding = np.zeros((len(idx), dim), np.float32)
    if payload is not None:
        embedding[ok] = encode.encode(session, listing.modality, payload, work.normalize)
    text = None
    if listing.texts is not None:
        text = np.zeros((len(idx), dim), np.float32)
        text[ok] = encode.encode_texts(session, [listing.texts[i] for i in indices], work.batch_size, work.normalize)
    return make_part(listing, idx, why, embedding, text)


def compute(work: Work, session, writer: Writer, workers: int) -> None:
    """Embed the pending shards' unsaved inputs, saving each batch's part and handing each finished
    shard to ``writer``."""
    from tqdm import tqdm

    listing, bs = work.listing, work.batch_size
    per_shard = {k: [todo[s:s + bs] for s in range(0, len(todo), bs)] for k in work.pending
                 for todo in [work.todo(k)]}
    flat = [b for k in work.pending for b in per_shard[k]]
    source = batches_of(listing, flat, session, workers)
    bar = tqdm(total=len(listing.items), initial=len(listing.items) - sum(len(b) for b in flat),
               unit=" img" if listing.modality == "image" else " text", disable=not work.progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    shards_written = batches_written = 0
    try:
        for k in work.pending:
            for _ in per_shard[k]:
                result = next(source)
                part = _part(work, session, result)
                save_part(work.state, k, part)
                for line in writer.part_saved(part):
                    bar.write(line, file=sys.stderr)
                bar.update(len(part["idx"]))
                batches_written += 1
                faults.after_batch(batches_written)
            for skip in writer.assemble(k, work.shards[k]):
                bar.write(writer.skipped_line(skip), file=sys.stderr)
            shards_written += 1
            faults.after_shard(shards_written)
    except KeyboardInterrupt:
        raise Interrupted(writer.interrupted(work, shards_written, batches_written, len(flat))) from None
    finally:
        bar.close()
