"""Fused residual add + LayerNorm: ``y = LayerNorm(x + x_bias + residual)`` over the last dim.

One kernel covers both transformer layouts:

- post-LN (text tower): ``LN(dense_out + dense_bias + residual)``: pass ``x_bias`` and ``residual``;
  the GEMM before it can then skip its bias epilogue.
- pre-LN (vision tower): ``h = h + attn_out; y = LN2(h)``: pass ``residual`` and ``return_sum=True``;
  the second output is the new residual stream ``h``.

The optional inputs are ``tl.constexpr`` flags, so each combination compiles to its own kernel with no
runtime branches. Statistics are computed in fp32 whatever the storage dtype.

Dtypes: ``x`` is fp32, fp16 or bf16, and both outputs have its dtype. ``weight``, ``bias``, ``x_bias``
and ``residual`` may each be ``x``'s dtype or fp32 (fp32 LayerNorm parameters next to fp16
activations are common). Layout: the last dim must be contiguous. A 2-D input may have strided rows
(``h[:, 0]``, the CLS tokens of a batch, works without a copy); higher-rank inputs must flatten to
rows without a copy.

Block size and warps come from a heuristic (:func:`launch_config`), not autotuning: the kernel is
memory-bound and one whole row sits in registers, so the only choices are how many rows one program
takes (small rows would leave most lanes idle) and how many warps share the work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime, _validate

__all__ = ["add_layer_norm", "launch_config", "MAX_HIDDEN"]

# One row is held in registers. At 8192 columns, 16 warps keep it at 16 fp32 values per thread and
# tensor; far beyond that the kernel would need a loop over column blocks.
MAX_HIDDEN = 8192


@triton.jit
def _add_layer_norm_fwd(
    X, X_BIAS, RESIDUAL, W, B, Y, SUM,
    M, N,
    stride_x, stride_r, stride_y, stride_s,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_X_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_SUM: tl.constexpr,
):
    # int64 row offsets: rows * stride exceeds 2**31 elements for large batches of 8192-wide rows.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]

    s = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        s += tl.load(X_BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        s += tl.load(RESIDUAL + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_SUM:
        tl.store(SUM + rows[:, None] * stride_s + cols[None, :], s.to(SUM.dtype.element_ty), mask=mask)

    # Two-pass statistics over the row held in registers: mean first, then the centred second moment,
    # which avoids the cancellation of E[x^2] - E[x]^2 for rows with a large mean.
    mean = tl.sum(s, axis=1) / N
    centred = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)

    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


_runtime.check_same_mode(_add_layer_norm_fwd)


def launch_config(n: int) -> dict:
    """``BLOCK_M`` (rows per program), ``BLOCK_N`` and ``num_warps`` for rows of ``n`` elements.

    A program handles about 1024 elements (several short rows, or one long row) so a warp always has
    work; warps grow with the row so each thread holds at most 16 fp32 values per tensor.
    """
    block_n = triton.next_power_of_2(n)
    block_m = min(16, max(1, 1024 // block_n))
    num_warps = min(16, max(1, block_m * block_n // 256))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}


@torch.library.triton_op("altclip_fast::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    x_bias: torch.Tensor | None,
    eps: float,
    return_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = _validate.as_rows("x", x, n)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # The op always returns two tensors (an op's schema is fixed); without return_sum the second is
    # empty and the kernel never touches it.
    s = torch.empty((m, n) if return_sum else (0,), dtype=x.dtype, device=x.device)
    r2 = _validate.as_rows("residual", residual, n) if residual is not None else None
    if m > 0:
        cfg = launch_config(n)
        block_m = cfg["BLOCK_M"]
        # Interpreted kernels are called directly: torch < 2.13's wrap_triton rejects them.
        kernel = _add_layer_norm_fwd if _runtime.INTERPRETED else torch.library.wrap_triton(_add_layer_norm_fwd)
        kernel[(triton.cdiv(m, block_m),)](
            x2, x_bias, r2, weight, bias, y, s,
            m, n,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), s.stride(0) if return_sum else 0,
            eps,
            BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
            HAS_X_BIAS=x_bias is not None, HAS_RESIDUAL=residual is not None,
            HAS_BIAS=bias is not None, STORE_SUM=return_sum,
            num_warps=cfg["num_warps"],
        )
    out_shape = x.shape
    return y.view(out_shape), (s.view(out_shape) if return_sum else s)


def _check_inputs(x, weight, bias, residual, x_bias, eps) -> None:
    _validate.check_tensor("x", x, dtypes=_validate.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    _runtime.check_device("x", x, "add_layer_norm")
    n = x.shape[-1]
    if n > MAX_HIDDEN:
        raise ValueError(f"x's last dimension is {n}; add_layer_norm supports at most {MAX_HIDDEN}")
    param_dtypes = (x.dtype, torch.float32)
    _validate.check_tensor("weight", weight, ndim=1, dtypes=param_dtypes, device=x.device)
    _validate.check_shape("weight", weight, (n,))
    for name, t in (("bias", bias), ("x_bias", x_bias)):
        if t is not None:
            _validate.check_tensor(name, t, ndim=1, dtypes=param_dtypes, device=x.device)
            _validate.check_shape(name, t, (n,))
    if residual is not None:
        _validate.check_tensor("residual", residual, dtypes=param_dtypes, device=x.device)
        _validate.check_shape("residual", residual, tuple(x.shape))
        _validate.as_rows("residual", residual, n)
    _validate.as_rows("x", x, n)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def add_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    residual: torch.Tensor | None = None,
    x_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    return_sum: bool = False,
):
    """``y = LayerNorm(x + x_bias + residual) * weight + bias`` over the last dim, stats in fp32.

    Returns ``y``, or ``(y, s)`` with ``return_sum=True`` where ``s = x + x_bias + residual`` (the
    residual stream of a pre-LN layer). Both have ``x``'s shape and dtype. See the module docstring
    for accepted dtypes and layouts.
    """
    _check_inputs(x, weight, bias, residual, x_bias, eps)
    y, s = torch.ops.altclip_fast.add_layer_norm(x, weight, bias, residual, x_bias, float(eps), bool(return_sum))
    return (y, s) if return_sum else y
