"""Exact cosine search over an ``--out-dir`` collection: ``Index(DIR).search(queries, k)`` and
``altclip-fast search DIR (--text ... | --image PATH)``.

The shards are memory-mapped and scored chunk by chunk (``chunk_rows`` rows at a time, widened to
float32 in one reused buffer), each chunk keeping only its own top-k, merged into a running top-k,
so memory stays bounded by the chunk whatever the collection's size. Scores are divided by the rows'
norms (computed on the first search and cached, 4 bytes a row), so ``--no-normalize`` collections rank
by cosine too. On a GPU the chunks are multiplied there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AltCLIPError, UsageError
from .embedding.shards import FILE_MODALITY, STATE

# On a CPU the float32 copy of a chunk should stay in the last-level cache between the widening and
# the product, which reads it back (4096 x 768 floats: 12 MiB; single queries ran 2.6x faster than
# with 65536-row chunks on a 2-core box); on a GPU bigger chunks mean fewer, fuller transfers and launches.
DEFAULT_CHUNK_ROWS = 1 << 12
DEFAULT_GPU_CHUNK_ROWS = 1 << 16
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's: an all-zero row scores 0, not NaN


@dataclass
class Hit:
    score: float
    shard: int
    row: int
    metadata: dict


class Index:
    """The shards of ``DIR/img_emb`` (``modality="image"``) or ``DIR/text_emb`` (``modality="text"``);
    ``modality=None`` takes images when there are any. ``chunk_rows=None`` picks a size for the device."""

    def __init__(self, directory: str | Path, modality: str | None = None, *, chunk_rows: int | None = None,
                 device=None):
        self.root = Path(directory).expanduser()
        if not (self.root / "metadata").is_dir():
            raise UsageError(f"{directory}: not an embed --out-dir collection (no metadata/ folder)")
        if modality is None:
            modality = "image" if (self.root / f"{FILE_MODALITY['image']}_emb").is_dir() else "text"
        if modality not in FILE_MODALITY:
            raise UsageError(f"modality must be one of {', '.join(FILE_MODALITY)}, got {modality!r}")
        self.modality = modality
        name = FILE_MODALITY[modality]  # clip-retrieval's file names say "img"
        paths = sorted((self.root / f"{name}_emb").glob(f"{name}_emb_*.npy"))
        if not paths:
            raise UsageError(f"{directory}: no {name}_emb shards")
        self.shard_ids = [int(p.stem.rsplit("_", 1)[1]) for p in paths]
        self._meta_paths = {s: self.root / "metadata" / f"metadata_{p.stem.rsplit('_', 1)[1]}.parquet"
                            for s, p in zip(self.shard_ids, paths)}
        # Copy-on-write rather than read-only: torch.from_numpy then views the pages without a copy
        # and without its non-writable-array warning. Nothing writes them, and a write would stay
        # private to this process anyway.
        self.shards = [np.load(p, mmap_mode="c") for p in paths]
        self.dim = self.shards[0].shape[1]
        if chunk_rows is not None and chunk_rows < 1:
            raise UsageError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.chunk_rows = chunk_rows
        self.device = device
        self._tables: dict[int, object] = {}
        # per shard, 1 / max(|row|, eps) as float32 on the search device; filled by the first search
        # that reads the shard, so later searches skip a pass over every chunk
        self._inv_norms: list = [None] * len(self.shards)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``queries [q, dim]`` -> ``(scores [q, k], shard [q, k], row [q, k])``, best first (fewer
        than ``k`` columns when the collection is smaller)."""
        import torch

        from ..devices import auto_device

        q = torch.from_numpy(np.array(queries, dtype=np.float32))  # a copy: read-only inputs are fine
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.dim:
            raise UsageError(f"queries have {q.shape[1]} dims, the collection {self.dim}")
        device = torch.device(self.device) if self.device else auto_device()
        chunk_rows = self.chunk_rows or (DEFAULT_CHUNK_ROWS if device.type == "cpu" else DEFAULT_GPU_CHUNK_ROWS)
        scan = _Scan(torch.nn.functional.normalize(q, dim=-1).to(device), min(k, len(self)), chunk_rows, self.dim)
        starts = []
        for si, shard in enumerate(self.shards):
            starts.append(scan.offset)
            self._inv_norms[si] = scan.shard(shard, self._inv_norms[si])
        flat = scan.best_ids.cpu().numpy()
        starts_np = np.asarray(starts)
        which = np.searchsorted(starts_np, flat, side="right") - 1
        shard_ids = np.asarray(self.shard_ids)[which]
        rows = flat - starts_np[which]
        return scan.best_scores.cpu().numpy(), shard_ids, rows

    def metadata(self, shard: int, row: int) -> dict:
        import pyarrow.parquet as pq

        if shard not in self._tables:
            self._tables[shard] = pq.read_table(self._meta_paths[shard])
        return self._tables[shard].slice(row, 1).to_pylist()[0]

    def hits(self, query: np.ndarray, k: int = 10) -> list[Hit]:
        scores, shards, rows = self.search(query, k)
        return [Hit(float(s), int(sh), int(r), self.metadata(int(sh), int(r)))
                for s, sh, r in zip(scores[0], shards[0], rows[0])]


class _Scan:
    """One search's pass over the shards, chunk by chunk, keeping the running top ``k`` per query."""

    def __init__(self, q, k: int, chunk_rows: int, dim: int):
        import torch

        self.q, self.k, self.chunk_rows, self.dim, self.offset = q, k, chunk_rows, dim, 0
        self.best_scores = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
        self.best_ids = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=q.device)
        self._buf = None  # float16 shards are widened on the device into this one buffer

    def shard(self, shard: np.ndarray, inv_norms):
        """Scan one shard; returns its inverse row norms (computed here the first time)."""
        import torch

        fresh = inv_norms is None
        if fresh:
            inv_norms = torch.empty(len(shard), device=self.q.device)
        elif inv_norms.device != self.q.device:
            inv_norms = inv_norms.to(self.q.device)
        for begin in range(0, len(shard), self.chunk_rows):
            rows = self._rows(shard[begin:begin + self.chunk_rows])
            n = len(rows)
            if fresh:
                norms = torch.linalg.vector_norm(rows, dim=1)
                inv_norms[begin:begin + n] = norms.clamp_min_(_NORM_EPS).reciprocal_()
            # cosine = (q . row) / |row|: scaling the [q, n] scores is cheaper than normalising the
            # [n, dim] rows
            scores = (self.q @ rows.T).mul_(inv_norms[begin:begin + n])
            self._merge(scores, self.offset + begin)
        self.offset += len(shard)
        return inv_norms

    def _rows(self, part: np.ndarray):
        import torch

        device = self.q.device
        if part.dtype != np.float16:
            # float32 needs no widening: on a CPU the product reads the mapped pages directly
            # (np.asarray is then a view); anything else is converted by numpy
            return torch.from_numpy(np.asarray(part, dtype=np.float32)).to(device)
        # float16 crosses to the device at its stored width; torch widens it there, threaded, into
        # one buffer reused for every chunk
        if self._buf is None:
            self._buf = torch.empty((self.chunk_rows, self.dim), device=device)
        rows = self._buf[:len(part)]
        rows.copy_(torch.from_numpy(part).to(device))
        return rows

    def _merge(self, scores, first_id: int) -> None:
        import torch

        top = scores.topk(min(self.k, scores.shape[1]), dim=1)
        chunk_ids = top.indices.add_(first_id)
        if self.best_scores.shape[1] == 0:
            self.best_scores, self.best_ids = top.values, chunk_ids
            return
        merged = torch.cat([self.best_scores, top.values], dim=1)
        ids = torch.cat([self.best_ids, chunk_ids], dim=1)
        top = merged.topk(min(self.k, merged.shape[1]), dim=1)
        self.best_scores, self.best_ids = top.values, ids.gather(1, top.indices)


def read_plan(root: str | Path) -> dict:
    """The collection's recorded plan (``{}`` when absent or unreadable): its model, and since plan
    version 4 ``input_root``, the absolute folder its images were listed under."""
    try:
        return json.loads((Path(root) / STATE / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def cmd_search(args, make_session, default_model: str | None = None) -> int:
    """``args``: directory, text, image, top_k, json and the model options (``--model`` left at
    ``default_model``: the collection's own model)."""
    if (args.text is None) == (args.image is None):
        raise UsageError("give exactly one of --text or --image")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    root = Path(args.directory)
    if not root.is_dir():
        raise UsageError(f"{args.directory}: no such directory")
    if args.image is not None and not Path(args.image).is_file():
        raise UsageError(f"{args.image}: no such file")
    index = Index(root, None if args.kind is None else {"img": "image", "text": "text"}[args.kind])
    if args.model in (None, default_model):
        args.model = read_plan(root).get("model") or args.model
    import torch

    session = make_session(args)
    with torch.inference_mode():
        if args.text is not None:
            enc = session.processor(text=[args.text]).to(session.device)
            query = session.model.get_text_features(enc["input_ids"], enc["attention_mask"])
        else:
            ip = session.processor.image_processor
            try:
                crop = ip.prepare(args.image)
            except AltCLIPError as exc:
                raise UsageError(str(exc)) from None
            pixels = ip.to_pixel_values_torch(torch.from_numpy(crop[None]).to(session.device))
            query = session.model.get_image_features(
                pixels.to(session.dtype), interpolate_pos_encoding=session.interpolate_pos_encoding)
    hits = index.hits(query.float().cpu().numpy(), args.top_k)
    if args.json:
        print(json.dumps([{"score": round(h.score, 6), "shard": h.shard, "row": h.row, **h.metadata} for h in hits],
                         ensure_ascii=False, indent=2, default=str))
    else:
        for h in hits:
            label = h.metadata.get("image_path") or h.metadata.get("caption") or h.metadata.get("key")
            print(f"{h.score:8.4f}  shard {h.shard} row {h.row}  {label}")
    return 0
