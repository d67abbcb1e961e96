"""Exact cosine search over an ``--out-dir`` collection: ``Index(DIR).search(queries, k)`` and
``altclip-fast search DIR (--text ... | --image PATH)``.

The shards are memory-mapped and multiplied chunk by chunk (``chunk_rows`` rows at a time, cast to
float32 there), keeping a running top-k, so memory stays bounded by the chunk whatever the
collection's size. Rows are divided by their norms, so ``--no-normalize`` collections rank by
cosine too. On a GPU the chunks are multiplied there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AltCLIPError, UsageError

DEFAULT_CHUNK_ROWS = 1 << 16


@dataclass
class Hit:
    score: float
    shard: int
    row: int
    metadata: dict


class Index:
    """The shards of ``DIR/img_emb`` (``kind="img"``) or ``DIR/text_emb`` (``kind="text"``);
    ``kind=None`` takes images when there are any."""

    def __init__(self, directory: str | Path, kind: str | None = None, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 device=None):
        self.root = Path(directory).expanduser()
        if not (self.root / "metadata").is_dir():
            raise UsageError(f"{directory}: not an embed --out-dir collection (no metadata/ folder)")
        if kind is None:
            kind = "img" if (self.root / "img_emb").is_dir() else "text"
        self.kind = kind
        paths = sorted((self.root / f"{kind}_emb").glob(f"{kind}_emb_*.npy"))
        if not paths:
            raise UsageError(f"{directory}: no {kind}_emb shards")
        self.shard_ids = [int(p.stem.rsplit("_", 1)[1]) for p in paths]
        self._meta_paths = {s: self.root / "metadata" / f"metadata_{p.stem.rsplit('_', 1)[1]}.parquet"
                            for s, p in zip(self.shard_ids, paths)}
        self.shards = [np.load(p, mmap_mode="r") for p in paths]
        self.dim = self.shards[0].shape[1]
        self.chunk_rows = chunk_rows
        self.device = device
        self._tables: dict[int, object] = {}

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``queries [q, dim]`` -> ``(scores [q, k], shard [q, k], row [q, k])``, best first (fewer
        than ``k`` columns when the collection is smaller)."""
        import torch

        q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.dim:
            raise UsageError(f"queries have {q.shape[1]} dims, the collection {self.dim}")
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        q = torch.nn.functional.normalize(q, dim=-1).to(device)
        k = min(k, len(self))
        best_scores = torch.full((q.shape[0], 0), float("-inf"), device=device)
        best_ids = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=device)
        offset = 0
        starts = []
        for shard in self.shards:
            starts.append(offset)
            for begin in range(0, len(shard), self.chunk_rows):
                chunk = torch.from_numpy(np.array(shard[begin:begin + self.chunk_rows], dtype=np.float32)).to(device)
                scores = q @ torch.nn.functional.normalize(chunk, dim=-1).T
                ids = torch.arange(offset + begin, offset + begin + len(chunk), device=device).expand(q.shape[0], -1)
                scores = torch.cat([best_scores, scores], dim=1)
                ids = torch.cat([best_ids, ids], dim=1)
                top = scores.topk(min(k, scores.shape[1]), dim=1)
                best_scores, best_ids = top.values, ids.gather(1, top.indices)
            offset += len(shard)
        flat = best_ids.cpu().numpy()
        starts_np = np.asarray(starts)
        which = np.searchsorted(starts_np, flat, side="right") - 1
        shard_ids = np.asarray(self.shard_ids)[which]
        rows = flat - starts_np[which]
        return best_scores.cpu().numpy(), shard_ids, rows

    def metadata(self, shard: int, row: int) -> dict:
        import pyarrow.parquet as pq

        if shard not in self._tables:
            self._tables[shard] = pq.read_table(self._meta_paths[shard])
        return self._tables[shard].slice(row, 1).to_pylist()[0]

    def hits(self, query: np.ndarray, k: int = 10) -> list[Hit]:
        scores, shards, rows = self.search(query, k)
        return [Hit(float(s), int(sh), int(r), self.metadata(int(sh), int(r)))
                for s, sh, r in zip(scores[0], shards[0], rows[0])]


def _plan(root: Path) -> dict:
    try:
        return json.loads((root / ".altclip-fast" / "plan.json").read_text(encoding="utf-8"))
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
    index = Index(root, args.kind)
    if args.model in (None, default_model):
        args.model = _plan(root).get("model") or args.model
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
