"""oneDNN on CPU: whether its fused linear works here, and weights pre-blocked for it.

``torch.ops.mkldnn._linear_pointwise`` is what inductor emits on CPU for linear + pointwise: one GEMM
with the bias, an activation or a residual add fused. It is a private torch op, so each capability is
probed once per dtype (a torch build without oneDNN, or a CPU without the dtype's instructions, falls
back to plain torch). Handed a plain weight, it re-blocks the weight into its own layout inside every
call; ``prepack`` does that once, for a copy the caller keeps.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["fused_linear", "fused_linear_works", "prepack_works", "prepack", "is_prepacked"]

# oneDNN picks the blocking of a pre-packed weight for an expected number of input rows. A blocking
# picked for an encoder batch (a few thousand token rows) also serves small batches well; one picked
# for a single row makes large GEMMs re-block on every call (bench/bench_cpu_ops.py measures both).
PACK_FOR_ROWS = 2048


def fused_linear():
    """``torch.ops.mkldnn._linear_pointwise``, or None where this torch has no oneDNN ops."""
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


@functools.cache
def fused_linear_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused linear runs and agrees with ``F.linear`` for ``dtype`` on this CPU."""
    op = fused_linear()
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=gen).to(dtype)
    w = torch.randn(8, 24, generator=gen).to(dtype)
    b = torch.randn(8, generator=gen).to(dtype)
    r = torch.randn(5, 8, generator=gen).to(dtype)
    try:
        with torch.no_grad():
            plain = op(x, w, b, "none", [], None)
            silu = op(x, w, b, "swish", [], None)
            gelu = op(x, w, b, "gelu", [], "none")
            added = op.binary(x, r, w, b, "add")
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    ref = F.linear(x.double(), w.double(), b.double())
    tol = 1e-4 if dtype == torch.float32 else 0.1
    return all(
        torch.allclose(got.double(), want, atol=tol, rtol=tol)
        for got, want in ((plain, ref), (silu, F.silu(ref)), (gelu, F.gelu(ref)), (added, ref + r.double()))
    )


def _reorder():
    return getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)


@functools.cache
def prepack_works(dtype: torch.dtype) -> bool:
    """Whether the fused linear accepts a weight pre-blocked by ``_reorder_linear_weight`` for ``dtype``
    and gives bit-identical results (a private op, like the fused linear itself)."""
    reorder = _reorder()
    if reorder is None or not fused_linear_works(dtype):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=gen).to(dtype)
    w = torch.randn(8, 24, generator=gen).to(dtype)
    try:
        with torch.no_grad():
            return torch.equal(fused_linear()(x, reorder(w, 5), None, "none", [], None),
                               fused_linear()(x, w, None, "none", [], None))
    except (RuntimeError, NotImplementedError):
        return False


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """A oneDNN-blocked copy of ``weight`` ``[out, in]`` (an opaque ``torch._mkldnn`` tensor that only
    the fused linear reads). Callers check ``prepack_works(weight.dtype)`` first."""
    with torch.no_grad():
        return _reorder()(weight.detach().contiguous(), PACK_FOR_ROWS)


def is_prepacked(t: torch.Tensor) -> bool:
    return t.layout == torch._mkldnn
