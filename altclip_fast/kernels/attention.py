"""Fused multi-head attention forward (FlashAttention-2 style), padded or packed (varlen).

``attention(q, k, v, *, key_padding_mask=None, cu_seqlens=None, max_seqlen=None, scale=None)``

Layouts
- Padded: q ``[batch, seq_q, heads, head_dim]``, k and v ``[batch, seq_k, heads, head_dim]`` (FlashAttention's
  layout). Any strides are accepted as long as the last dim is contiguous, so q/k/v can be free views of a
  fused QKV projection (``qkv.view(batch, seq, 3, heads, head_dim).unbind(2)``).
  ``key_padding_mask`` is ``[batch, seq_k]``, bool or integer, True/nonzero marking a real key.
- Packed: q, k, v ``[total_tokens, heads, head_dim]``, sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``
  (``cu_seqlens`` int32 ``[batch + 1]`` on the same device). Pass ``max_seqlen`` (a Python int, the longest
  sequence) to keep the call free of host syncs; without it the launcher reads ``cu_seqlens`` back to the host.

The output is a new contiguous tensor with q's shape and dtype. The kernel never materialises the
``[seq, seq]`` score matrix: each program owns ``BLOCK_M`` query rows of one (batch, head) and streams
``BLOCK_N`` keys at a time through an online softmax with fp32 statistics and accumulator. Query rows whose
keys are all masked return zeros (never NaN), matching ``reference.ops.attention``.

The op is registered as ``torch.ops.altclip_fast.attention`` with ``torch.library.triton_op`` so that
``torch.compile(fullgraph=True)`` traces through it on CUDA.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import _runtime
from ._validate import check_tensor

__all__ = ["attention"]

MAX_HEAD_DIM = 128
# Masks may be bool (read as bytes) or any integer type; nonzero means "real token".
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    acc, l_i, m_i, q,
    k_ptrs, v_ptrs, mask_ptrs, start_n, seqlen_k, qk_scale,
    offs_n, d_ok,
    BOUNDARY: tl.constexpr, HAS_MASK: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys ``start_n .. start_n + BLOCK_N`` into the running (acc, l_i, m_i).

    ``BOUNDARY`` blocks may hold keys past ``seqlen_k`` or masked-out keys; interior blocks of an unmasked
    call skip all key masking, which is what keeps the common case as cheap as the tutorial kernel.
    """
    if BOUNDARY:
        key_ok = (start_n + offs_n) < seqlen_k
        if HAS_MASK:
            key_ok = key_ok & (tl.load(mask_ptrs, mask=key_ok, other=0) != 0)
        k = tl.load(k_ptrs, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    elif PAD_D:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)

    # Scores in log2 units: qk_scale = softmax scale * log2(e), so exp2 below is exp of the true scores.
    qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    if BOUNDARY:
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if HAS_MASK:
        # A row that has seen only masked keys keeps m = -inf; shifting by 0 instead of -inf keeps
        # exp2(-inf - (-inf)) = NaN out of it, so its p and l stay exactly 0.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    p = tl.math.exp2(qk - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attention_fwd(
    Q, K, V, Out, KeyMask, CuSeqlens,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_mb, stride_ms,
    n_heads, seqlen_q, seqlen_k, qk_scale,
    SEQ_BUCKET,  # autotune key only: the max sequence length rounded up to a power of two
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    if VARLEN:
        seq_start = tl.load(CuSeqlens + b)
        seqlen_q = tl.load(CuSeqlens + b + 1) - seq_start
        seqlen_k = seqlen_q
        row0 = seq_start.to(tl.int64)
    else:
        row0 = tl.zeros([], dtype=tl.int64)
    # The grid covers the longest sequence; programs past the end of a shorter one have nothing to do.
    if pid_m * BLOCK_M >= seqlen_q:
        return

    # int64 bases: batch * stride overflows int32 for large batches of fused-QKV views.
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + row0 * stride_qs + h * stride_qh
    k_base = K + b64 * stride_kb + row0 * stride_ks + h * stride_kh
    v_base = V + b64 * stride_vb + row0 * stride_vs + h * stride_vh
    o_base = Out + b64 * stride_ob + row0 * stride_os + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # head_dim is padded up to BLOCK_D (a power of two >= 16, as tl.dot needs); padded lanes load zeros,
    # which add nothing to q.k and produce output columns that are never stored.
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen_q

    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]  # K^T tile: [BLOCK_D, BLOCK_N]
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    if HAS_MASK:
        mask_ptrs = KeyMask + b64 * stride_mb + offs_n * stride_ms
    else:
        mask_ptrs = KeyMask

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Unmasked calls run whole key blocks without per-key checks, then at most one ragged tail block.
    # With a padding mask every block needs the mask, so all of them take the checked path.
    if HAS_MASK:
        n_unchecked = 0
    else:
        n_unchecked = (seqlen_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_unchecked, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q,
            k_ptrs + start_n * stride_ks, v_ptrs + start_n * stride_vs, mask_ptrs, start_n, seqlen_k, qk_scale,
            offs_n, d_ok,
            BOUNDARY=False, HAS_MASK=False, PAD_D=PAD_D, DOT_PRECISION=DOT_PRECISION,
        )
    for start_n in range(n_unchecked, seqlen_k, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q,
            k_ptrs + start_n * stride_ks, v_ptrs + start_n * stride_vs, mask_ptrs + start_n * stride_ms,
            start_n, seqlen_k, qk_scale,
            offs_n, d_ok,
            BOUNDARY=True, HAS_MASK=HAS_MASK, PAD_D=PAD_D, DOT_PRECISION=DOT_PRECISION,
        )

    # l_i == 0 only for rows with no real key (or seqlen_k == 0): they output zeros.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        o_base + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


# --- launch configuration -------------------------------------------------------------------------------

_runtime.check_same_mode(_attention_fwd)

# Under TRITON_INTERPRET=1 autotuning would only re-run numpy code per config, so the interpreter gets
# this one fixed config; 32 x 32 blocks still exercise interior blocks and ragged tails at the small
# lengths tests use.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}

# The estimate in `_smem_bytes` is what sm_90 cubins report exactly (sm_80 ones use less), measured with
# tests/kernels/test_attention_aot.py.
_MAX_STAGES = 3


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _tile_class(head_dim: int, elem_bytes: int) -> tuple[int, int]:
    """Head dims up to 64 share the 64-wide config list: their tiles are no larger, so whatever fits and
    does not spill at 64 fits at 16 or 32 too, and one AOT compile of the 64 class covers them all."""
    return max(64, _block_d(head_dim)), elem_bytes


def _smem_bytes(bm: int, bn: int, stages: int, block_d: int, elem_bytes: int) -> int:
    # K and V tiles are buffered `stages` deep for the software pipeline; Q stays resident.
    return (2 * stages * bn + bm) * block_d * elem_bytes


# 16-bit configs that spill or use more than 247 of 255 registers in some AltCLIP launch (ptxas, Triton 3.6 to
# 3.9, head_dim 64: tests/kernels/test_compile_facts.py). The masked variant (the text tower's pooled-only last
# layer) is the heaviest. On sm_80 mma.sync holds operand fragments in registers. (BLOCK_M, BLOCK_N, warps).
_AT_REGISTER_CEILING = {
    80: {(128, 128, 8): "104-108 bytes spilled, masked (3.9)",
         (64, 64, 4): "4-8 bytes spilled, masked and packed (3.9)",
         (128, 32, 4): "253 registers, masked (3.9)"},
    90: {(128, 128, 8): "132 bytes spilled, masked (3.9)"},
}


def _keep(config: triton.Config, block_d: int, elem_bytes: int, arch: int, fma: bool) -> bool:
    """Whether an autotune candidate is worth compiling and benchmarking for this tile class.

    Every candidate costs a compile and a benchmark on each new autotune key, so the list stays short.
    """
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    warps, stages = config.num_warps, config.num_stages
    # fp32 is the exactness path, not the fast one: one tile, no tuning. With IEEE products tl.dot lowers to
    # FMA loops whose operands live in registers: on 4 warps even 64 x 32 spills 0.6-1.5 KiB (head_dim 64),
    # on 8 warps it fits (about 210 registers). TF32 runs on tensor cores, where 8 warps on 64 rows would
    # sit idle and spill (4 bytes, Triton 3.7), and 4 warps fit.
    if elem_bytes == 4:
        tile = (64, 32, 8) if fma else (64, 32, 4)
        return (bm, bn, warps) == tile and _deepest_pipeline(bm, bn, stages, block_d, elem_bytes)
    # An MMA tile gives each warp 16 query rows; more warps than BLOCK_M / 16 would sit idle.
    if warps * 16 > bm or bn > bm:
        return False
    # Per-thread fp32 live state, accumulator (BM x D) plus score tile (BM x BN): past 96 floats ptxas spills;
    # at 96 it depends on the variant and the architecture (the table above).
    if (bm * block_d + bm * bn) // (32 * warps) > 96:
        return False
    if (bm, bn, warps) in _AT_REGISTER_CEILING[arch]:
        return False
    return _deepest_pipeline(bm, bn, stages, block_d, elem_bytes)


def _deepest_pipeline(bm: int, bn: int, stages: int, block_d: int, elem_bytes: int) -> bool:
    """The pipeline depth is not tuned: take the deepest that fits, since a deeper one only costs smem."""
    if _smem_bytes(bm, bn, stages, block_d, elem_bytes) > _runtime.SMEM_BUDGET:
        return False
    return stages == _MAX_STAGES or _smem_bytes(bm, bn, stages + 1, block_d, elem_bytes) > _runtime.SMEM_BUDGET


_ALL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
    for bm in (64, 128)
    for bn in (32, 64, 128)
    for warps in (4, 8)
    for stages in range(1, _MAX_STAGES + 1)
]


def _class_configs(block_d: int, elem_bytes: int, arch: int, fma: bool) -> list[triton.Config]:
    return [c for c in _ALL_CONFIGS if _keep(c, block_d, elem_bytes, arch, fma)]


def autotune_configs(head_dim: int, dtype: torch.dtype, input_precision: str = "ieee", *,
                     capability: int) -> list[triton.Config]:
    """The configs the CUDA autotuner chooses from for this head_dim and dtype (for fp32, with IEEE or TF32
    products) on a GPU of this compute capability (also used by the AOT tests)."""
    block_d, elem_bytes = _tile_class(head_dim, torch.empty((), dtype=dtype).element_size())
    fma = dtype == torch.float32 and input_precision == "ieee"
    return _class_configs(block_d, elem_bytes, _runtime.arch_family(capability), fma)


@functools.lru_cache(maxsize=None)
def _tuned_kernel(block_d: int, elem_bytes: int, arch: int, fma: bool):
    """One autotuner per tile class (see `_tile_class`), architecture and product kind: each gets only configs
    that fit its tiles, so no candidate fails to compile for lack of shared memory. The key buckets the
    sequence length so texts of 8..77 tokens share a few tuning runs instead of one per length."""
    configs = _class_configs(block_d, elem_bytes, arch, fma)
    return triton.autotune(configs=_runtime.tuned_configs(configs),
                           key=["SEQ_BUCKET", "HEAD_DIM", "HAS_MASK", "VARLEN"])(_attention_fwd)


def _seq_bucket(max_seqlen: int) -> int:
    """The sequence length rounded up to a power of two (at least 16), the autotune key.

    Written as comparisons rather than bit tricks: under torch.compile with dynamic shapes the length is a
    SymInt, and each comparison becomes a range guard, so a new length recompiles only when it crosses a
    bucket boundary."""
    bucket = 16
    while bucket < max_seqlen:
        bucket *= 2
    return bucket


# --- the registered op ------------------------------------------------------------------------------------
#
# triton_op + wrap_triton make the launch visible to torch.compile: it traces into this body and sees the
# kernel call (a plain custom_op would be opaque). The same op also serves CPU tensors under the interpreter,
# eagerly, calling the interpreted kernel directly: torch < 2.13's wrap_triton rejects interpreted kernels,
# and torch.compile cannot trace them anyway (only real JITFunction/Autotuner objects), so that path only
# matters on CUDA.
# allow_tf32 is an argument, not read in here, so the op is a pure function of its inputs.


@torch.library.triton_op("altclip_fast::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
    allow_tf32: bool,
) -> torch.Tensor:
    """Launch on already-validated inputs. Padded inputs are 4-D, packed inputs 3-D with ``cu_seqlens``."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    varlen = cu_seqlens is not None
    if varlen:
        batch = cu_seqlens.shape[0] - 1
        # Packed rows are addressed from cu_seqlens; the batch stride is unused.
        sq, sk, sv, so = ((0,) + tuple(t.stride()[:2]) for t in (q, k, v, out))
        seqlen_q = seqlen_k = max_seqlen
    else:
        batch = q.shape[0]
        sq, sk, sv, so = (tuple(t.stride()[:3]) for t in (q, k, v, out))
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    heads, head_dim = q.shape[-2], q.shape[-1]
    if out.numel() == 0 or batch == 0 or max_seqlen == 0:
        return out
    if seqlen_k == 0:
        return out.zero_()  # no keys at all: every query row is a fully masked row

    has_mask = key_padding_mask is not None
    if has_mask:
        mask = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
        stride_mb, stride_ms = mask.stride()
    else:
        mask, stride_mb, stride_ms = q, 0, 0  # never read: HAS_MASK=False
    cu = cu_seqlens if varlen else q  # never read: VARLEN=False

    # fp32 inputs: exact IEEE products unless the caller opted in to TF32 the way torch's matmul does.
    precision = "tf32" if (q.dtype != torch.float32 or allow_tf32) else "ieee"
    args = (
        q, k, v, out, mask, cu,
        *sq, *sk, *sv, *so,
        stride_mb, stride_ms,
        heads, seqlen_q, seqlen_k, scale * _LOG2E,
        _seq_bucket(max(max_seqlen, seqlen_k)),
    )
    flags = dict(
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), HAS_MASK=has_mask, VARLEN=varlen, DOT_PRECISION=precision,
    )

    def grid(meta):
        return (batch * heads, triton.cdiv(max_seqlen, meta["BLOCK_M"]))

    if _runtime.INTERPRETED:
        _attention_fwd[grid](*args, **flags, **INTERPRETER_CONFIG)  # see the note above the op
    else:
        arch = _runtime.arch_family(_runtime.capability(q.device))
        kernel = _tuned_kernel(*_tile_class(head_dim, q.element_size()), arch, precision == "ieee")
        torch.library.wrap_triton(kernel)[grid](*args, **flags)
    return out


# --- public launcher ---------------------------------------------------------------------------------------


def _check_inputs(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale) -> None:
    varlen = cu_seqlens is not None
    rank = 3 if varlen else 4
    layout = "[total_tokens, heads, head_dim] with cu_seqlens" if varlen else "[batch, seq, heads, head_dim]"
    check_tensor("q", q, ndim=rank)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=rank, device=q.device)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    _runtime.check_device("q", q, "kernels.attention")
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim} (layout {layout})")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if varlen:
        if k.shape != q.shape:
            raise ValueError(f"k must have q's shape {tuple(q.shape)} in the packed layout, got {tuple(k.shape)}")
    elif k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"k must match q in batch, heads and head_dim ({layout}), got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )

    if key_padding_mask is not None:
        if varlen:
            raise ValueError("key_padding_mask cannot be combined with cu_seqlens: packed sequences need no mask")
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=_MASK_DTYPES, device=q.device,
                     last_dim_contiguous=False)
        expected = (k.shape[0], k.shape[1])
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(
                f"key_padding_mask must have shape [batch, seq_k] = {expected}, got {tuple(key_padding_mask.shape)}"
            )

    if varlen:
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=None, dtype=torch.int32, device=q.device)
        if cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must have batch + 1 >= 1 entries, got an empty tensor")
        if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
            raise TypeError(f"max_seqlen must be a Python int, got {type(max_seqlen).__name__}")
        if max_seqlen is not None and max_seqlen < 0:
            raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    elif max_seqlen is not None:
        raise ValueError("max_seqlen is only used with cu_seqlens (the padded layout takes it from q's shape)")

    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact non-causal softmax attention, ``softmax(q k^T * scale) v`` per head.

    Args:
        q, k, v: padded ``[batch, seq, heads, head_dim]`` (k and v may have another ``seq`` than q), or packed
            ``[total_tokens, heads, head_dim]`` with ``cu_seqlens``. fp32, fp16 or bf16, all the same dtype;
            any strides with a contiguous last dim; head_dim up to 128.
        key_padding_mask: padded layout only, ``[batch, seq_k]`` bool or integer, True/nonzero = real key.
        cu_seqlens: int32 ``[batch + 1]`` sequence offsets into the packed rows (non-decreasing, ending at
            ``total_tokens``; not checked, since that would need a device sync).
        max_seqlen: packed layout only, the longest sequence. It must not be smaller than the true maximum
            (rows past it would be left unwritten). If None it is computed from ``cu_seqlens``, which costs a
            device-to-host sync and breaks CUDA-graph capture.
        scale: softmax scale, ``1 / sqrt(head_dim)`` by default.

    Returns:
        A new contiguous tensor with q's shape and dtype. Query rows with no real key are zeros.

    fp32 inputs use IEEE-exact products unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
    """
    _check_inputs(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is not None:
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.shape[0] > 1 else 0
    else:
        max_seqlen = q.shape[1]
    return torch.ops.altclip_fast.attention(
        q, k, v, key_padding_mask, cu_seqlens, max_seqlen, float(scale), torch.backends.cuda.matmul.allow_tf32
    )
