"""What an embedding run was asked to do (``EmbedJob``), the work an engine is handed (``Work``),
and what an engine hands its results to (``Writer``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .inputs import Listing


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; its text says what is saved and how to finish (printed once, by the CLI)."""


@dataclass(frozen=True)
class EmbedJob:
    """``altclip-fast embed``'s command line, minus the model options. Exactly one of ``out`` (one
    ``.npy``/``.safetensors`` file) and ``out_dir`` (shards) is set."""

    input: str  # folder, glob, image file, caption file, or (out_dir) webdataset tars
    model: str  # as the user named it, for the metadata
    batch_size: int
    workers: int | None  # None: local_engine.default_workers()
    normalize: bool
    resume: bool
    overwrite: bool
    progress: bool
    exif_transpose: bool
    fast_decode: bool
    out: str | None = None
    out_dir: str | None = None
    shard_size: int | None = None  # out_dir: inputs per shard
    emb_dtype: str = "float16"  # out_dir: the stored dtype
    with_text: bool = False
    engine: str = "local"
    ray_address: str | None = None
    ray_workers: int = 1
    ray_gpus_per_worker: float | None = None
    ray_cpus_per_worker: float | None = None


@dataclass
class Work:
    """What an engine computes: the ``pending`` shards of ``listing`` (``shards[k]``: the input
    indices of shard ``k``), minus the ``saved`` inputs that parts in ``state`` already cover."""

    listing: Listing
    shards: list[range]
    pending: list[int]
    saved: set[int]
    state: Path
    batch_size: int
    normalize: bool
    progress: bool

    def todo(self, k: int) -> list[int]:
        return [i for i in self.shards[k] if i not in self.saved]

    @property
    def reused(self) -> int:
        """Inputs of the pending shards that come from saved parts."""
        return sum(len(self.shards[k]) - len(self.todo(k)) for k in self.pending)


class Writer(Protocol):
    """What both writers offer the engines. ``assemble`` may run in another process (a Ray task), so a
    writer is made of plain, picklable values."""

    def part_saved(self, part: dict) -> list[str]:
        """Lines to print once a batch's part is saved (the single-file writer reports skips here)."""

    def assemble(self, k: int, shard: range) -> list[dict]:
        """Shard ``k``'s parts are all saved: write what the writer writes per shard; returns its
        skipped inputs, to report (``skipped_line``)."""

    def skipped_line(self, skip: dict) -> str: ...

    def interrupted(self, work: Work, shards_written: int, batches_written: int, batches_left: int) -> str:
        """What Ctrl-C leaves saved, and how to finish."""
