"""Exact search over a synthetic collection: N random D-dim float16 (or --dtype float32) rows (L2-normalised) in
clip-retrieval's layout, searched with ``altclip_fast.apps.search.Index``. Prints queries/s per query
batch size and the process's peak resident memory (ru_maxrss; it counts the memory-mapped shard pages
that were read, which the kernel can drop, as well as the search's own buffers). The first search
(a one-row self-retrieval check) is timed apart: it also computes the rows' norms, which the index
caches for the later ones.

    python bench/bench_search.py --rows 1000000 --dim 768 --shard-size 100000 [--device cuda]
        [--dtype float32] [--chunk-rows N]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def make(root: Path, rows: int, dim: int, shard_size: int, seed: int = 0, dtype: str = "float16",
         captions: bool = False) -> None:
    """``rows`` random unit rows in ``embed --out-dir``'s layout under ``root``, each shard's metadata
    (``key``, and ``caption`` on request) written before its embeddings, as ``embed`` publishes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    shards = range(0, rows, shard_size)
    width = len(str(len(shards) - 1))
    for k, start in enumerate(shards):
        n = min(shard_size, rows - start)
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        columns = {"key": [f"{start + i:09d}" for i in range(n)]}
        if captions:
            columns["caption"] = [f"row {start + i}" for i in range(n)]
        pq.write_table(pa.table(columns), root / "metadata" / f"metadata_{k:0{width}d}.parquet")
        np.save(root / "img_emb" / f"img_emb_{k:0{width}d}.npy", x.astype(dtype))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--shard-size", type=int, default=100_000)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    ap.add_argument("--chunk-rows", type=int, default=None, help="default: the index's own for the device")
    args = ap.parse_args()

    import torch

    from altclip_fast.apps.search import Index

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make(root, args.rows, args.dim, args.shard_size, dtype=args.dtype)
        print(f"wrote {args.rows} x {args.dim} {args.dtype} rows in {time.perf_counter() - t:.1f}s")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        index = Index(root, device=args.device, chunk_rows=args.chunk_rows)
        rng = np.random.default_rng(1)
        # self-retrieval check: a stored row finds itself first
        row = np.asarray(index.shards[3 % len(index.shards)][7], dtype=np.float32)
        t = time.perf_counter()
        _, shard_ids, row_ids = index.search(row, k=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        print(f"first search (with the norms pass): {(time.perf_counter() - t) * 1e3:.1f} ms")
        assert (int(shard_ids[0, 0]), int(row_ids[0, 0])) == (index.shard_ids[3 % len(index.shards)], 7)
        for b in args.batches:
            q = rng.standard_normal((b, args.dim), dtype=np.float32)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                index.search(q, args.k)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            best = min(times)
            print(f"batch {b:4d}: {best * 1e3:8.1f} ms per search (best of {args.repeats}), {b / best:8.2f} queries/s")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        on_disk = args.rows * args.dim * np.dtype(args.dtype).itemsize / 2**20
        print(f"peak RSS {peak:.0f} MiB (before the index: {before:.0f} MiB; the shards are "
              f"{on_disk:.0f} MiB on disk); torch threads {torch.get_num_threads()}, "
              f"device {index.device or ('cuda' if torch.cuda.is_available() else 'cpu')}")


if __name__ == "__main__":
    main()
