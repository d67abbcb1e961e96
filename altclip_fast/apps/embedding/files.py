"""Writing files safely: every write of the embedding pipeline goes through ``open`` here.

- A file is written to a temporary name (``.<name>.tmp``) and renamed into place, so a file with its
  final name is always complete; on any error the temporary file is removed.
- A full disk (ENOSPC, EDQUOT, EFBIG) or any other write error becomes one line naming the file and
  saying what to do next (``write_error``).
- Outputs are written with plain writes, never a memory map: a page of a memory-mapped file that
  cannot be backed on a full disk kills the process with SIGBUS. Space is reserved first where the
  file system supports it.
- One run per output at a time: ``exclusive_output`` probes the folder with a small file (an
  unwritable folder is a one-line error before the model loads), then takes a ``flock``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import AltCLIPError, UsageError

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
RESUME_HINT = "rerun the same command with --resume (the batches written so far are kept)"


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def temp(path: Path) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp")


def write_error(path: Path, exc: OSError, then: str) -> AltCLIPError:
    """One line for a failed write: what, why, and what to do next (``then``)."""
    if exc.errno in DISK_FULL:
        return AltCLIPError(f"cannot write {path}: no space left on device; free some space, then {then}")
    return AltCLIPError(f"cannot write {path}: {exc.strerror or exc}; {then}")


class Writing:
    """``with Writing(final, tmp, then) as f:`` writes ``tmp`` (fsynced when ``sync``), and on any
    error removes it; an ``OSError`` becomes a one-line ``AltCLIPError`` naming ``final``. The caller
    renames ``tmp`` into place (``replace``)."""

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
        remove(self.tmp)
        if isinstance(exc, OSError):
            raise write_error(self.final, exc, self.then) from None
        return False


def replace(tmp: Path, final: Path, then: str) -> None:
    try:
        os.replace(tmp, final)
    except OSError as exc:
        remove(tmp)
        raise write_error(final, exc, then) from None


def write_file(final: Path, write: Callable, then: str = RESUME_HINT, *, tmp: Path | None = None,
               sync: bool = True) -> int:
    """``write(f)`` into a temporary file, then renamed to ``final``; returns the size."""
    tmp = tmp or temp(final)
    with Writing(final, tmp, then, sync=sync) as f:
        write(f)
    size = tmp.stat().st_size
    replace(tmp, final, then)
    return size


def write_json(final: Path, value, then: str) -> None:
    write_file(final, lambda f: f.write(json.dumps(value, ensure_ascii=False, indent=1).encode("utf-8")), then)


def reserve(f, nbytes: int) -> None:
    """Claim the file's space up front, so that a full disk fails here rather than halfway through."""
    if nbytes and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise
            # EOPNOTSUPP, EINVAL: a file system without fallocate; the writes will tell.


class Hashing:
    """Writes to ``f`` and counts and hashes what it wrote."""

    def __init__(self, f):
        self.f, self.nbytes, self.sha = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.nbytes += len(data)
        self.sha.update(data)


def npy_header(header: dict) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def write_npy_array(f, array: np.ndarray) -> None:
    """One whole array as ``.npy``, with plain writes and the space reserved first."""
    array = np.ascontiguousarray(array)
    header = npy_header({"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
                         "shape": array.shape})
    reserve(f, len(header) + array.nbytes)
    f.write(header)
    f.write(array.tobytes())


# ---------------------------------------------------------------------------------------------- one run per output


@contextmanager
def exclusive_output(out: Path, lock: Path, flag: str = "--out") -> Iterator[None]:
    """The output location checked writable (a probe file next to ``out``, before any model loads),
    then held by this run alone (a ``flock`` on ``lock``) until the block ends."""
    _probe_writable(out, flag)
    fd = _take_lock(out, lock, flag)
    try:
        yield
    finally:
        if fd is not None:
            remove(lock)
            os.close(fd)


def _probe_writable(out: Path, flag: str) -> None:
    probe = out.with_name(f".{out.name}.probe-{os.getpid()}")
    created = False
    try:
        with open(probe, "wb") as f:
            created = True
            f.write(b"probe")
    except OSError as exc:
        if exc.errno in DISK_FULL:  # a failure of the machine, not of the command line: status 1
            raise write_error(out.parent, exc, "run again") from None
        raise UsageError(f"{flag} {out}: cannot write in the folder {out.parent}: {exc.strerror or exc}") from None
    finally:
        if created:  # on a read-only file system even removing a file that is not there fails
            remove(probe)


def _take_lock(out: Path, lock: Path, flag: str):
    """An exclusive ``flock`` on ``lock``: one run per output at a time (None without fcntl)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"{flag} {out}: cannot create {lock}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip()
            os.close(fd)
            raise UsageError(
                f"another altclip-fast embed{f' (pid {holder})' if holder else ''} is writing {out} "
                f"(it holds {lock}): wait for it to finish, or choose another {flag}"
            ) from None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:  # else the run we waited on removed it: take the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
