"""Whether this CPU multiplies bf16/fp16 natively, and what a half-precision GEMM runs as where it does not.

A CPU without bf16 instructions (no avx512_bf16 or AMX on x86, no BF16 extension on Arm) still runs
bf16 GEMMs: oneDNN and MKL emulate them, about 3x slower than fp32 on the same shape
(bench/bench_cpu_half.py). There, a GEMM of ``UPCAST_FROM_ROWS`` rows or more runs as an fp32 GEMM on
operands upcast exactly from bf16/fp16, with its bias, activation and residual in fp32, and the result
rounded once to the half dtype. That is what a native half GEMM computes too (fp32 accumulation, one
rounding of the output), so the answers stay the half dtype's. Below that many rows, converting the
weight costs more than the emulated GEMM, which keeps running.

``ALTCLIP_FAST_CPU_HALF_GEMM`` = ``auto`` (default: upcast only where the CPU has no native
instructions for the dtype), ``native`` (never upcast) or ``fp32`` (always upcast past the row
threshold). It is read when a model resolves its backend (``ops.get_ops``), not per GEMM.
"""

from __future__ import annotations

import functools

import torch

from .settings import choose

__all__ = ["ENV_VAR", "MODES", "UPCAST_FROM_ROWS", "cpu_half_mode", "cpu_flags", "native_gemm", "upcasts"]

ENV_VAR = "ALTCLIP_FAST_CPU_HALF_GEMM"
MODES = ("auto", "native", "fp32")

# The crossover measured on a 2-core avx512 Xeon without bf16 at AltCLIP's GEMM shapes
# (bench/bench_cpu_half.py, bench/RESULTS.md): at 8 rows the upcast loses up to 1.3x, at 16 it breaks
# even (0.9-1.1x), from 32 rows on it wins 1.3-1.8x, at 257 rows (one image) 2.7-3.8x. 32 keeps clear
# of the noisy break-even.
UPCAST_FROM_ROWS = 32

# CPU feature flags that give native GEMM instructions per dtype: x86 /proc/cpuinfo "flags", Arm "Features".
_NATIVE_FLAGS = {
    torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
    torch.float16: frozenset({"avx512_fp16", "amx_fp16", "fphp", "asimdhp"}),
}


def cpu_half_mode(mode: str | None = None) -> str:
    """``mode``, else ``$ALTCLIP_FAST_CPU_HALF_GEMM``, validated: ``auto``, ``native`` or ``fp32``."""
    return choose(mode, ENV_VAR, MODES, "cpu_half_gemm")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS or Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_gemm(dtype: torch.dtype, flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has GEMM instructions for ``dtype``. Where its flags cannot be read, yes: half
    GEMMs then run as they did before this check existed."""
    flags = cpu_flags() if flags is None else flags
    return not flags or bool(flags & _NATIVE_FLAGS.get(dtype, frozenset()))


def upcasts(mode: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether GEMMs of ``dtype`` on ``device`` run in fp32 (past ``UPCAST_FROM_ROWS`` rows) in ``mode``."""
    if device.type != "cpu" or dtype not in _NATIVE_FLAGS or mode == "native":
        return False
    return mode == "fp32" or not native_gemm(dtype)
