"""GEMM with a fused epilogue: ``act(x @ weight.T + bias) (+ residual)``.

``weight`` is ``[N, K]`` as ``nn.Linear`` stores it, so checkpoints need no transpose; the fused QKV
projection is the same op with a ``[3 * hidden, hidden]`` weight. ``activation`` is None, ``"gelu"``
(exact erf, XLM-R) or ``"quick_gelu"`` (``x * sigmoid(1.702 x)``, CLIP vision). The epilogue runs on
the fp32 accumulator before the single rounding to the output dtype, so the fused op is at least as
accurate as ``F.linear`` followed by a separate activation.

Dtypes: ``x`` and ``weight`` share one dtype (fp32, fp16 or bf16), which is the output dtype;
``bias`` and ``residual`` may be that dtype or fp32. Accumulation is fp32. fp32 inputs use IEEE
products unless ``torch.backends.cuda.matmul.allow_tf32`` is on, exactly when ``F.linear`` would use
TF32. Layout: the last dim of every tensor must be contiguous; a 2-D ``x``, ``weight`` or ``residual``
may have strided rows, higher-rank ones must flatten to rows without a copy.

Tiles are autotuned per (bucketed M, N, K, dtype, epilogue) from a config list pruned per GPU
architecture; the interpreter uses one fixed small config. Programs walk output tiles in groups of ``GROUP_M`` row
blocks so that the weight columns a group needs stay in L2 while its row blocks reuse them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _runtime, _validate
from .activations import EPILOGUE_CODES as ACTIVATIONS, QUICK_GELU_ALPHA

__all__ = ["linear", "autotune_configs", "ACTIVATIONS", "INTERPRETER_CONFIG"]

_ALPHA = tl.constexpr(QUICK_GELU_ALPHA)  # a jitted function reads globals only as constexpr


# M_BUCKET only keys the autotuner; specialising on it (== 1, % 16) would compile needless variants.
@triton.jit(do_not_specialize=["M_BUCKET"])
def _linear_fwd(
    X, W, BIAS, RESIDUAL, Y,
    M, N, K,
    stride_xm, stride_wn, stride_rm, stride_ym,
    M_BUCKET,  # autotune key only (see _m_bucket); the kernel never reads it
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
):
    # Grouped order: consecutive programs cover GROUP_M row blocks of one column block before moving
    # to the next column block, so a weight tile is fetched from HBM once per group, not once per row.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    group = pid // pids_per_group
    first_m = group * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge are wrapped back in range (and never stored), so the main loop only
    # masks the K tail; int64 keeps row offsets exact past 2**31 elements.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    x_ptrs = X + rm[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + rn[None, :] * stride_wn + offs_k[:, None]  # a [BLOCK_K, BLOCK_N] tile of weight.T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:  # no K tail (AltCLIP's 1024 and 4096): unmasked loads pipeline best
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # The epilogue runs on column halves of the tile: the activation and the residual's pointers and
    # values would otherwise be live for the whole tile at once and push big tiles into spills.
    if EPILOGUE_SPLIT == 2:
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(halves)
        _epilogue(acc0, offs_m, pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2), M, N, BIAS, RESIDUAL, Y,
                  stride_rm, stride_ym, HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
        _epilogue(acc1, offs_m, pid_n * BLOCK_N + BLOCK_N // 2 + tl.arange(0, BLOCK_N // 2), M, N, BIAS, RESIDUAL,
                  Y, stride_rm, stride_ym, HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
    else:
        _epilogue(acc, offs_m, offs_n, M, N, BIAS, RESIDUAL, Y, stride_rm, stride_ym,
                  HAS_BIAS, ACTIVATION, HAS_RESIDUAL)


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, BIAS, RESIDUAL, Y, stride_rm, stride_ym,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Bias, activation and residual on an fp32 tile of the output, then one rounding and the store."""
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:  # exact GELU
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == 2:  # quick GELU
        acc = acc * tl.sigmoid(acc * _ALPHA)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m[:, None].to(tl.int64)
    if HAS_RESIDUAL:
        acc += tl.load(RESIDUAL + rows * stride_rm + offs_n[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(Y + rows * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=out_mask)


_runtime.check_same_mode(_linear_fwd)

# Under TRITON_INTERPRET=1 autotuning would time numpy code; one fixed config covers the masking
# paths instead: 32 x 32 x 16 tiles make the test shapes span several row, column and K blocks.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4, "EPILOGUE_SPLIT": 2}

# _smem_estimate is exact on sm_90 and conservative on sm_80 (tests/kernels/test_linear_aot.py).


def _smem_estimate(block_m: int, block_n: int, block_k: int, stages: int, elem_bytes: int) -> int:
    """Bytes of the software pipeline's operand buffers: ``stages`` copies of an x and a w tile."""
    return (block_m + block_n) * block_k * elem_bytes * stages


def _keep(block_m: int, block_n: int, block_k: int, stages: int, warps: int, elem_bytes: int, fma: bool) -> bool:
    tile = block_m * block_n
    # The fp32 accumulator has tile / (32 * warps) values per thread: 4 warps on a 128 x 256 tile would
    # need 256 registers for it alone and spill; 8 warps on a 64 x 64 tile leave warps without work.
    if warps == 8 and tile < 128 * 128:
        return False
    if warps == 4 and tile > 128 * 128:
        return False
    # Deep pipelines pair with thin K slices, shallow ones with thick: same bytes in flight, fewer
    # configs to benchmark.
    if (stages == 4) != (block_k == 32):
        return False
    # IEEE fp32 products run on FMA units with both operand slices in registers next to the
    # accumulator: thick K slices or 128 accumulators per thread spill there (measured on sm_80).
    if fma and (block_k > 32 or tile // (32 * warps) > 64):
        return False
    return _smem_estimate(block_m, block_n, block_k, stages, elem_bytes) <= _runtime.SMEM_BUDGET


_MAX_BLOCK_K = 64
_TILES = ((64, 64), (64, 128), (128, 64), (128, 128), (128, 256), (256, 128))

# Configs pruned because some AltCLIP launch spills in them or uses more than 247 of the 255 registers a
# thread may have, on Triton 3.6, 3.7, 3.8 or 3.9 (ptxas's report; tests/kernels/test_compile_facts.py holds
# every config left to that on the Triton installed). At the ceiling any growth of the epilogue spills.
# Most have a sibling with the same tile that stays (8 warps, or the other BLOCK_K); gemm="auto" measures
# cuBLAS against the rest. On sm_80, mma.sync keeps both operand fragments in registers next to the
# accumulator, where sm_90's wgmma reads them from shared memory, so sm_80 loses more; IEEE fp32 runs on
# FMA units with everything in registers. (variant, BLOCK_M, BLOCK_N, BLOCK_K, warps) -> what ptxas said.
_AT_REGISTER_CEILING = {
    80: {
        ("16bit", 128, 128, 32, 4): "252 registers (3.9)",
        ("16bit", 128, 128, 64, 4): "254 registers (3.9)",
        ("16bit", 128, 256, 32, 8): "248 registers (3.9)",
        ("16bit", 256, 128, 32, 8): "248 registers (3.9)",
        ("16bit", 128, 256, 64, 8): "255 registers (3.7), 254 (3.6)",
        ("16bit", 256, 128, 64, 8): "12 bytes spilled (3.6, 3.7)",
        ("16bit", 64, 128, 64, 4): "8 bytes spilled with exact GELU (3.6)",
        ("tf32", 128, 128, 32, 4): "255 registers (3.9)",
        ("tf32", 64, 128, 64, 4): "8 bytes spilled with exact GELU (3.6)",
        ("ieee", 64, 128, 32, 4): "255 registers (3.9)",
        ("ieee", 128, 64, 32, 4): "254 registers (3.9)",
        ("ieee", 128, 128, 32, 8): "254 registers (3.9)",
    },
    90: {
        ("16bit", 128, 256, 64, 8): "254 registers with quick_gelu (3.9)",
        ("16bit", 128, 128, 64, 4): "248 registers with quick_gelu (3.8)",
        ("16bit", 256, 128, 64, 8): "248 registers with quick_gelu (3.8)",
        ("tf32", 128, 128, 32, 4): "254 registers (3.9)",
        ("ieee", 128, 128, 32, 8): "254 registers (3.9)",
        ("ieee", 128, 64, 32, 4): "254 registers (3.6, 3.7)",
        ("ieee", 64, 64, 32, 4): "16 bytes spilled (3.7)",
    },
}


def autotune_configs(dtype: torch.dtype, input_precision: str = "ieee", *, capability: int) -> list[triton.Config]:
    """Every config the autotuner may pick for ``dtype`` operands (and, for fp32, ``input_precision``) on
    a GPU of this compute capability (``80``, ``90``, ...)."""
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    variant = _variant(dtype, input_precision)
    heavy = _AT_REGISTER_CEILING[_runtime.arch_family(capability)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EPILOGUE_SPLIT": 2},
                      num_warps=w, num_stages=s)
        for bm, bn in _TILES
        for bk in (32, 64)
        for s in (3, 4)
        for w in (4, 8)
        if _keep(bm, bn, bk, s, w, elem_bytes, variant == "ieee") and (variant, bm, bn, bk, w) not in heavy
    ]


_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "HAS_BIAS", "ACTIVATION", "HAS_RESIDUAL", "INPUT_PRECISION"]
# One autotuner per config list: 16-bit operands, fp32 on tensor cores (TF32), fp32 on FMA units
# (IEEE), per architecture. A list chosen before launch needs no pruning hook at launch, which
# torch.compile's handling of user kernels would have to replay. The autotuner's cache key adds the
# argument dtypes itself.
_TUNED_VARIANTS = {
    "16bit": (torch.float16, "ieee"),
    "tf32": (torch.float32, "tf32"),
    "ieee": (torch.float32, "ieee"),
}


@functools.lru_cache(maxsize=None)
def _tuned(variant: str, arch: int):
    dtype, precision = _TUNED_VARIANTS[variant]
    configs = autotune_configs(dtype, precision, capability=arch)
    return triton.autotune(configs=_runtime.tuned_configs(configs), key=_AUTOTUNE_KEY)(_linear_fwd)


def _variant(dtype: torch.dtype, input_precision: str) -> str:
    return input_precision if dtype == torch.float32 else "16bit"


def _m_bucket(m: int) -> int:
    """Autotune key for M: its power-of-two ceiling. Token counts vary per batch (packed text), and a
    best tile depends on M's scale, not its exact value; exact M would re-benchmark every batch."""
    return triton.next_power_of_2(max(m, 1))


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee"  # fp16/bf16 operands are exact on tensor cores; the flag only matters for fp32


@torch.library.triton_op("altclip_fast::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: int,
    input_precision: str,
) -> torch.Tensor:
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = _validate.as_rows("x", x, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    r2 = _validate.as_rows("residual", residual, n) if residual is not None else None
    if m > 0 and n > 0:
        args = (
            x2, weight, bias, r2, y,
            m, n, k,
            x2.stride(0), weight.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
            _m_bucket(m),
        )
        flags = dict(
            HAS_BIAS=bias is not None, ACTIVATION=activation, HAS_RESIDUAL=residual is not None,
            INPUT_PRECISION=input_precision,
            # Every BLOCK_K in any config (interpreter's included) divides 64, so this holds for all.
            EVEN_K=k % _MAX_BLOCK_K == 0,
        )

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        if _runtime.INTERPRETED:
            # Interpreted kernels are called directly: torch < 2.13's wrap_triton rejects them.
            _linear_fwd[grid](*args, **flags, **INTERPRETER_CONFIG)
        else:
            arch = _runtime.arch_family(_runtime.capability(x.device))
            kernel = _tuned(_variant(x.dtype, input_precision), arch)
            torch.library.wrap_triton(kernel)[grid](*args, **flags)
    return y.view(*x.shape[:-1], n)


def _check_inputs(x, weight, bias, activation, residual) -> None:
    _validate.check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., in_features], got shape {tuple(x.shape)}")
    _runtime.check_device("x", x, "linear")
    _validate.check_tensor("weight", weight, ndim=2, device=x.device, dtype=x.dtype)
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(
            f"weight must have shape [out_features, {k}] to match x's last dim {k}, got {tuple(weight.shape)}"
        )
    out_shape = (*x.shape[:-1], n)
    if bias is not None:
        _validate.check_tensor("bias", bias, ndim=1, dtypes=(x.dtype, torch.float32), device=x.device)
        _validate.check_shape("bias", bias, (n,))
    if residual is not None:
        _validate.check_tensor("residual", residual, dtypes=(x.dtype, torch.float32), device=x.device)
        _validate.check_shape("residual", residual, out_shape)
        _validate.as_rows("residual", residual, n)
    _validate.as_rows("x", x, k)
    if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {[a for a in ACTIVATIONS if a]} or None, got {activation!r}")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ weight.T + bias) (+ residual)`` with fp32 accumulation, in ``x``'s dtype.

    ``x`` is ``[..., K]``, ``weight`` ``[N, K]``, ``bias`` ``[N]``, ``residual`` ``[..., N]``; the
    result is ``[..., N]``. See the module docstring for dtypes and layouts.
    """
    _check_inputs(x, weight, bias, activation, residual)
    return torch.ops.altclip_fast.linear(x, weight, bias, residual, ACTIVATIONS[activation], _input_precision(x.dtype))
