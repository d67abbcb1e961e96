"""A safetensors checkpoint read one tensor at a time, straight into the tensor that keeps it.

Loading a 3.5 GB fp32 checkpoint into a bf16 model used to hold the whole file in memory (as
safetensors' mmap'd pages, which count in RSS, or as ``load_file``'s tensors) next to the converted
model. ``LazyStateDict`` reads the file with plain ``read`` calls into a small reusable buffer and
converts each slice into its destination (``read_into``), so loading holds the model plus a few MB.
Where a caller wants a tensor as stored, ``state[key]`` reads a fresh copy of that one tensor.

The format (``safetensors``' own, documented by its authors): an 8-byte little-endian header length,
a JSON header naming each tensor's dtype, shape and byte range after the header, then the bytes.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["LazyStateDict", "open_safetensors", "can_read_lazily", "renamed"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Bytes read per call: large enough that the syscalls cost nothing next to the conversion, small
# enough to be noise next to any tensor of the model.
CHUNK_BYTES = 16 << 20


def can_read_lazily() -> bool:
    """The stored bytes are little-endian; a big-endian host reads through safetensors itself."""
    return sys.byteorder == "little"


class _File:
    """One open safetensors file: its header, and reads of byte ranges after it."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, struct.error, ValueError) as exc:
            raise CheckpointError(
                f"{path} could not be read ({type(exc).__name__}: {str(exc).strip()[:200]}); "
                "it may be truncated or corrupt: download it again"
            ) from None
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.size = path.stat().st_size
        self.entries = {}
        for key, entry in header.items():
            dtype = _DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
            begin, end = (entry.get("data_offsets") or (0, -1)) if dtype is not None else (0, -1)
            shape = tuple(entry.get("shape", ())) if dtype is not None else ()
            numel = 1
            for n in shape:
                numel *= n
            if dtype is None or end - begin != numel * dtype.itemsize or self.data_start + end > self.size:
                raise CheckpointError(
                    f"{path} could not be read (tensor {key} has a bad header entry or lies past the end of the "
                    "file); it may be truncated or corrupt: download it again"
                )
            self.entries[key] = (dtype, torch.Size(shape), self.data_start + begin)

    def readinto(self, offset: int, view: memoryview) -> None:
        if self._handle is None:
            self._handle = open(self.path, "rb", buffering=0)
        self._handle.seek(offset)
        done = 0
        while done < len(view):
            n = self._handle.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{self.path} ended early: it may be truncated: download it again")
            done += n

    def release(self) -> None:
        """Close the file and ask the kernel to drop its cached pages: the model holds the weights now."""
        if self._handle is None:
            return
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._handle.close()
        self._handle = None


def renamed(items, rename: Callable[[str], str | None]) -> dict:
    """``{rename(key): value}`` over ``(key, value)`` pairs, leaving out keys it maps to None; two keys
    renamed alike are a CheckpointError (a checkpoint holding a layer under both layouts)."""
    out = {}
    for key, value in items:
        new = rename(key)
        if new is None:
            continue
        if new in out:
            raise CheckpointError(f"checkpoint holds {new} twice, under both layer layouts")
        out[new] = value
    return out


class LazyStateDict(Mapping):
    """A state dict whose tensors stay in their files until asked for. ``spec(key)`` gives dtype and
    shape without reading; ``read_into(key, out)`` converts the stored tensor into ``out`` slice by
    slice; ``state[key]`` reads a fresh tensor as stored."""

    def __init__(self, entries: dict[str, tuple[_File, str]]):
        self._entries = entries
        self._buffer: bytearray | None = None  # reused by every read: one CHUNK_BYTES allocation per load

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape = self.spec(key)
        out = torch.empty(shape, dtype=dtype)
        self.read_into(key, out)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def spec(self, key: str) -> tuple[torch.dtype, torch.Size]:
        file, stored = self._entries[key]
        dtype, shape, _ = file.entries[stored]
        return dtype, shape

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy the stored tensor into ``out`` (its shape, any dtype and device), converting as
        ``out.copy_`` does: rounded once to ``out``'s dtype."""
        file, stored = self._entries[key]
        dtype, shape, offset = file.entries[stored]
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"{key}: stored {tuple(shape)}, destination {tuple(out.shape)}")
        flat = out.view(-1) if out.is_contiguous() else None
        numel = shape.numel()
        step = max(1, CHUNK_BYTES // dtype.itemsize)
        if self._buffer is None or len(self._buffer) < step * dtype.itemsize:
            self._buffer = bytearray(step * dtype.itemsize)
        buffer = self._buffer
        target = flat if flat is not None else torch.empty(numel, dtype=out.dtype, device=out.device)
        for start in range(0, numel, step):
            count = min(step, numel - start)
            view = memoryview(buffer)[: count * dtype.itemsize]
            file.readinto(offset + start * dtype.itemsize, view)
            target[start:start + count].copy_(torch.frombuffer(view, dtype=dtype, count=count))
        if flat is None:
            out.copy_(target.view(shape))

    def rekeyed(self, rename: Callable[[str], str | None]) -> "LazyStateDict":
        """The same tensors under ``rename(key)``; keys it maps to None are left out. Reads nothing."""
        return LazyStateDict(renamed(self._entries.items(), rename))

    def release(self) -> None:
        """Close the files and drop their cached pages (see ``_File.release``); reading again reopens."""
        self._buffer = None
        for file in {id(f): f for f, _ in self._entries.values()}.values():
            file.release()


def open_safetensors(paths: list[Path]) -> LazyStateDict:
    """The tensors of one safetensors file or of a model's shards, read lazily."""
    entries: dict[str, tuple[_File, str]] = {}
    for path in paths:
        file = _File(path)
        for key in file.entries:
            if key in entries:
                raise CheckpointError(f"{key} is in both {entries[key][0].path.name} and {path.name}")
            entries[key] = (file, key)
    return LazyStateDict(entries)
