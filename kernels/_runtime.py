"""What every kernel module needs to know about how Triton runs here.

- ``INTERPRETED``: whether ``triton.jit`` defined the kernels for Triton's interpreter
  (``TRITON_INTERPRET=1`` when they were defined) rather than for the GPU compiler. The switch is read
  when a kernel is decorated, so it holds for every kernel module imported in the same setting;
  ``check_same_mode`` catches a module imported under the other one.
- ``check_device``: compiled kernels take CUDA tensors, interpreted ones CPU tensors too.
- ``SMEM_BUDGET``: the shared memory per block that autotune pruning allows for.
"""

from __future__ import annotations

import torch
import triton
from triton.runtime.jit import JITFunction

__all__ = ["INTERPRETED", "SMEM_BUDGET", "check_device", "check_same_mode"]


@triton.jit
def _probe():
    pass


# Under the interpreter `triton.jit` returns an interpreter object instead of a JITFunction.
INTERPRETED = not isinstance(_probe, JITFunction)

# The smaller of A100's 163 KiB and H100's 227 KiB per block, less headroom for the compiler's
# scratch. The AOT tests (tests/kernels/*_aot.py) check every kept config against the compiler's
# own figure on both targets.
SMEM_BUDGET = 160 * 1024


def check_same_mode(kernel) -> None:
    """Raise if ``kernel`` was defined in the other mode than the kernels before it."""
    if (not isinstance(kernel, JITFunction)) != INTERPRETED:
        raise ImportError(
            "the kernels modules were imported under different TRITON_INTERPRET settings; "
            "set it once, before importing any of them"
        )


def check_device(name: str, t: torch.Tensor, op: str) -> None:
    """Raise unless ``t`` can reach the kernels: a CUDA tensor, or any tensor under the interpreter."""
    if not (t.is_cuda or INTERPRETED):
        raise ValueError(
            f"{name} is on {t.device}: {op} runs on CUDA tensors "
            "(CPU tensors run only under TRITON_INTERPRET=1, set before importing kernels)"
        )
