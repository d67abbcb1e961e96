"""Which library runs fp32 GEMMs on this CPU: oneDNN's fused linear, or torch's BLAS GEMM.

oneDNN's fused linear (``onednn.fused_linear``) runs the bias, an activation or a residual add inside
the GEMM; torch's ``F.linear`` (MKL on x86 builds, another BLAS elsewhere) applies them in place after
it, one more pass over the output each. Which is faster is a property of the CPU, not of its vendor's
name: on a 2-core AMD EPYC with AVX-512, oneDNN ran AltCLIP's fp32 GEMMs 1.1-1.3x faster than MKL
and the whole model 1.1x faster (bench/RESULTS.md), where on the Intel Xeons measured before MKL's GEMM
won by more than the fusion saves. So the first fp32 model on a CPU times both on one GEMM of the
model's MLP shape and every later fp32 GEMM uses the winner. fp32 GEMMs here include the ones that
the half-precision upcast path (``cpu_half``) runs on CPUs without bf16 instructions.

``ALTCLIP_FAST_CPU_FP32_GEMM`` = ``auto`` (default: measure once per process), ``onednn`` or ``blas``.
It is read when a model resolves its backend (``ops.get_ops``), not per GEMM.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from . import onednn
from .settings import choose

__all__ = ["ENV_VAR", "MODES", "cpu_fp32_gemm_mode", "fp32_uses_onednn", "measure"]

ENV_VAR = "ALTCLIP_FAST_CPU_FP32_GEMM"
MODES = ("auto", "onednn", "blas")

# The timed GEMM: one image's token rows through the MLP's up projection (hidden 1024 -> 4096), with
# its bias. Small enough to time in ~0.1 s on two cores, big enough that both libraries run their
# steady-state kernels rather than their small-matrix paths.
_ROWS, _IN, _OUT = 257, 1024, 4096
_REPS = 3


def cpu_fp32_gemm_mode(mode: str | None = None) -> str:
    """``mode``, else ``$ALTCLIP_FAST_CPU_FP32_GEMM``, validated: ``auto``, ``onednn`` or ``blas``."""
    return choose(mode, ENV_VAR, MODES, "cpu_fp32_gemm")


def fp32_uses_onednn(mode: str) -> bool:
    """Whether fp32 GEMMs on CPU run as oneDNN's fused linear in ``mode``: forced, or (``auto``) where
    it works and the measurement found it faster."""
    if mode == "blas" or not onednn.fused_linear_works(torch.float32):
        return False
    return mode == "onednn" or _measured_winner(torch.get_num_threads()) == "onednn"


@functools.cache
def _measured_winner(threads: int) -> str:
    """The faster library at ``threads`` threads, measured once (the answer differs with the thread
    count only through the CPU, so it is cached per count)."""
    times = measure()
    return min(times, key=times.get)


def measure(reps: int = _REPS) -> dict[str, float]:
    """Seconds of one bias-fused GEMM of the MLP's shape per library: the best of ``reps`` calls each,
    interleaved so that a burst of other load hits both alike."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_ROWS, _IN, generator=gen)
    w = torch.randn(_OUT, _IN, generator=gen) * _IN**-0.5
    b = torch.randn(_OUT, generator=gen)
    op = onednn.fused_linear()
    calls = {"onednn": lambda: op(x, w, b, "none", [], None), "blas": lambda: F.linear(x, w, b)}
    best = dict.fromkeys(calls, float("inf"))
    with torch.inference_mode():
        for fn in calls.values():  # warm-up: first calls allocate and pick kernels
            fn()
        for _ in range(reps):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best
