"""Which GEMM runs each shape on CUDA: the Triton kernel with its fused epilogue, or torch's GEMM (cuBLAS)
followed by the epilogue in torch. Decided by measurement, per shape, on the GPU at hand.

A Triton GEMM with the bias, activation and residual fused saves whole passes over the output, but
cuBLAS may still win at some shapes (small M, or where its tiles fit the chip better). Which one wins
depends on the card, the dtype and the shape, so it is timed, not assumed: the first call of each
shape key times both paths on the real inputs (CUDA events, median of a few runs, after a warm-up that
also autotunes the Triton kernel) and keeps the faster for every later call of that key. Autotuners do
the same with tile configs; this is one level up, with whole implementations as the candidates.

``ALTCLIP_FAST_GEMM`` = ``auto`` (default), ``triton`` or ``torch`` forces one path everywhere. It is
read when a model resolves its backend (``ops.get_ops``), not per GEMM.
Nothing is measured while torch.compile traces or a CUDA graph is captured (timing needs a sync, which
both forbid): an unmeasured key then takes the Triton kernel. Warm the model up eagerly first.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from .settings import choose

__all__ = ["ENV_VAR", "MODES", "gemm_mode", "MeasuredChoice", "cuda_time"]

ENV_VAR = "ALTCLIP_FAST_GEMM"
MODES = ("auto", "triton", "torch")


def gemm_mode(mode: str | None = None) -> str:
    """``mode``, else ``$ALTCLIP_FAST_GEMM``, validated: ``auto`` (measure per shape), ``triton`` or ``torch``."""
    return choose(mode, ENV_VAR, MODES, "gemm")


def cuda_time(fn: Callable[[], object], reps: int = 5) -> float:
    """Median seconds of ``fn`` on the current CUDA stream, after one untimed warm-up call."""
    fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def can_measure() -> bool:
    """False while torch.compile traces or a CUDA graph is being captured: a timing sync would break both."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class MeasuredChoice:
    """The faster of several interchangeable implementations, measured once per key and remembered.

    ``timer(fn)`` returns seconds for one call of ``fn`` (``cuda_time`` by default). ``choices`` and
    ``timings`` record every decision, so a benchmark can report which path each shape took.
    """

    def __init__(self, timer: Callable[[Callable[[], object]], float] = cuda_time):
        self._timer = timer
        self.choices: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}

    def pick(self, key: tuple, candidates: dict[str, Callable[[], object]], default: str) -> str:
        """The remembered winner for ``key``; else, when measuring is allowed, time every candidate and
        remember the fastest; else ``default`` (not remembered, so a later eager call measures)."""
        hit = self.choices.get(key)
        if hit is not None:
            return hit
        if not can_measure():
            return default
        times = {name: self._timer(fn) for name, fn in candidates.items()}
        best = min(times, key=times.get)
        self.choices[key], self.timings[key] = best, times
        return best

    def report(self) -> list[dict]:
        """One record per measured key: the key's fields, the winner and each candidate's time."""
        return [
            {"key": list(key), "choice": self.choices[key], "seconds": self.timings[key]}
            for key in self.choices
        ]
