"""What every kernel module needs to know about how Triton runs here.

- ``INTERPRETED``: whether ``triton.jit`` defined the kernels for Triton's interpreter
  (``TRITON_INTERPRET=1`` when they were defined) rather than for the GPU compiler. The switch is read
  when a kernel is decorated, so it holds for every kernel module imported in the same setting;
  ``check_same_mode`` catches a module imported under the other one.
- ``check_device``: compiled kernels take CUDA tensors, interpreted ones CPU tensors too.
- ``SMEM_BUDGET``: the shared memory per block that autotune pruning allows for.
- ``capability``, ``arch_family``: a CUDA device's compute capability as one number (80, 90), and
  the family of autotune config lists it takes: what fits in registers differs between architectures.
- ``tuned_configs``: an autotuner's config list, cut to ``$ALTCLIP_FAST_AUTOTUNE_LIMIT`` entries
  when that is set. On a cold machine every new autotune key compiles and times every config; a
  correctness run does not need the fastest tile, and one config per key turns minutes into seconds.
"""

from __future__ import annotations

import torch
import triton
from triton.runtime.jit import JITFunction

from .. import environment

__all__ = ["ARCH_FAMILIES", "AUTOTUNE_LIMIT_VAR", "INTERPRETED", "SMEM_BUDGET", "arch_family", "capability",
           "check_device", "check_same_mode", "tuned_configs"]


@triton.jit
def _probe():
    pass


# Under the interpreter `triton.jit` returns an interpreter object instead of a JITFunction.
INTERPRETED = not isinstance(_probe, JITFunction)

# The smaller of A100's 163 KiB and H100's 227 KiB per block, less headroom for the compiler's
# scratch. The AOT tests (tests/kernels/*_aot.py) check every kept config against the compiler's
# own figure on both targets.
SMEM_BUDGET = 160 * 1024


# The architectures that autotune config lists are chosen for: sm_80 (Ampere, mma.sync) and sm_90
# (Hopper, wgmma). A GPU tunes with the family at or below its own capability.
ARCH_FAMILIES = (80, 90)


def capability(device: torch.device) -> int:
    """``major * 10 + minor`` of a CUDA device (90 on H100/H200, 80 on A100)."""
    if not torch.cuda.is_available():
        # Only a trace on fake CUDA tensors gets here (torch.compile or export on a machine without a
        # GPU): no kernel runs, and the newest family's configs stand in.
        return ARCH_FAMILIES[-1]
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def arch_family(capability: int) -> int:
    """The config family of a compute capability (see ``ARCH_FAMILIES``)."""
    return max((f for f in ARCH_FAMILIES if f <= capability), default=ARCH_FAMILIES[0])


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


AUTOTUNE_LIMIT_VAR = "ALTCLIP_FAST_AUTOTUNE_LIMIT"


def tuned_configs(configs: list) -> list:
    """``configs`` as the autotuner gets them: the first ``$ALTCLIP_FAST_AUTOTUNE_LIMIT`` (read when the
    kernels are defined), or all of them. Lists put a safe, broadly good config first."""
    raw = environment.get(AUTOTUNE_LIMIT_VAR)
    if not raw:
        return configs
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(f"{AUTOTUNE_LIMIT_VAR} must be a positive integer, got {raw!r}") from None
    if limit < 1:
        raise ValueError(f"{AUTOTUNE_LIMIT_VAR} must be a positive integer, got {raw!r}")
    return configs[:limit]
