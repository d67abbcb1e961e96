"""kernels.linear against reference.ops.linear.

Without CUDA these run under Triton's interpreter on CPU tensors with the launcher's fixed 32 x 32 x 16
tile, so small M, N, K still span several row, column and K blocks (ragged tails, partial swizzle
groups). Low precision uses the three-way rule: the kernel's error against the fp32 reference is at
most twice plain torch's error in the same dtype, plus a small atol.
"""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from altclip_fast.kernels import linear
from altclip_fast.reference import ops

linear_module = sys.modules["altclip_fast.kernels.linear"]  # `kernels.linear` the attribute is the function

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

FP32_TOL = dict(atol=3e-5, rtol=1e-5)
LOW_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _inputs(m, n, k, dtype, *, bias=True, residual=False, lead=None, seed=0, bias_dtype=None, residual_dtype=None):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    x_shape = (*lead, k) if lead else (m, k)
    out_shape = (*x_shape[:-1], n)
    return dict(
        x=rand(*x_shape),
        weight=rand(n, k, scale=1.0 / math.sqrt(max(k, 1))),  # keeps outputs O(1) for every K
        bias=rand(n, dt=bias_dtype or dtype, scale=0.5) if bias else None,
        residual=rand(*out_shape, dt=residual_dtype or dtype) if residual else None,
    )


def _run(inp, activation=None):
    return linear(inp["x"], inp["weight"], inp["bias"], activation=activation, residual=inp["residual"])


def _reference(inp, activation=None):
    up = {k: (v.float() if v is not None else None) for k, v in inp.items()}
    return ops.linear(up["x"], up["weight"], up["bias"], activation=activation, residual=up["residual"])


def _torch_same_dtype(inp, activation=None):
    """Plain torch in the input dtype: cuBLAS-style F.linear, then the activation, then the add."""
    x = inp["x"]
    b = inp["bias"].to(x.dtype) if inp["bias"] is not None else None
    y = F.linear(x, inp["weight"], b)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "quick_gelu":
        y = y * torch.sigmoid(1.702 * y)
    if inp["residual"] is not None:
        y = y + inp["residual"].to(x.dtype)
    return y


def _check(inp, activation=None):
    y = _run(inp, activation)
    ref = _reference(inp, activation)
    dtype = inp["x"].dtype
    assert y.dtype == dtype
    assert y.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, **FP32_TOL)
        return
    err = (y.float() - ref).abs().max().item()
    torch_err = (_torch_same_dtype(inp, activation).float() - ref).abs().max().item()
    assert err <= 2 * torch_err + LOW_ATOL[dtype], f"kernel error {err:.3g} vs torch {dtype} error {torch_err:.3g}"


SHAPES = [(1, 16, 16), (7, 33, 17), (17, 100, 33), (33, 7, 100), (100, 257, 16), (257, 17, 7), (257, 100, 33),
          (1, 1, 1)]


@pytest.mark.parametrize("m,n,k", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_reference(m, n, k, dtype):
    _check(_inputs(m, n, k, dtype, residual=True, seed=m + n + k), activation="gelu")


@pytest.mark.parametrize("activation,bias,residual",
                         list(itertools.product([None, "gelu", "quick_gelu"], [False, True], [False, True])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_every_epilogue(activation, bias, residual, dtype):
    _check(_inputs(17, 40, 24, dtype, bias=bias, residual=residual, seed=4), activation=activation)


def test_activations_are_applied_before_residual():
    """act(xW^T + b) + r, not act(xW^T + b + r): with a negative pre-activation and a large residual the
    two orders differ by far more than rounding."""
    x = torch.ones(1, 16, device=DEVICE)
    w = -torch.ones(16, 16, device=DEVICE)  # pre-activation -16: GELU ~ 0
    r = torch.full((1, 16), 20.0, device=DEVICE)
    y = linear(x, w, None, activation="gelu", residual=r)
    torch.testing.assert_close(y, torch.full_like(y, 20.0), atol=1e-4, rtol=0)


def test_unsplit_epilogue(monkeypatch):
    """Autotune configs split the epilogue in column halves; the single-pass branch must agree."""
    monkeypatch.setitem(linear_module.INTERPRETER_CONFIG, "EPILOGUE_SPLIT", 1)
    _check(_inputs(33, 40, 24, torch.float32, residual=True, seed=5), activation="quick_gelu")


def test_fused_qkv_projection_equals_three_projections():
    hidden = 64
    inp = _inputs(0, 3 * hidden, hidden, torch.float32, lead=(2, 9), seed=6)
    qkv = _run(inp)
    assert qkv.shape == (2, 9, 3 * hidden)
    for part, chunk in enumerate(qkv.split(hidden, dim=-1)):
        rows = slice(part * hidden, (part + 1) * hidden)
        alone = linear(inp["x"], inp["weight"][rows], inp["bias"][rows])
        torch.testing.assert_close(chunk, alone, **FP32_TOL)
    torch.testing.assert_close(qkv, _reference(inp), **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_leading_dims_are_flattened(dtype):
    _check(_inputs(0, 24, 40, dtype, residual=True, lead=(2, 3, 5), seed=7), activation="gelu")


def test_one_dimensional_input():
    g = torch.Generator().manual_seed(8)
    x, w, b = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((24,), (20, 24), (20,)))
    y = linear(x, w, b)
    assert y.shape == (20,)
    torch.testing.assert_close(y, ops.linear(x, w, b), **FP32_TOL)


def test_fp32_bias_and_residual_with_fp16_inputs():
    inp = _inputs(17, 40, 24, torch.float16, residual=True, bias_dtype=torch.float32,
                  residual_dtype=torch.float32, seed=9)
    _check(inp, activation="gelu")


def test_strided_rows_need_no_copy():
    """Row-strided views (a column block of a wider activation, a slice of a fused weight's columns)."""
    g = torch.Generator().manual_seed(10)
    x_buf = torch.randn(19, 50, generator=g).to(DEVICE)
    w_buf = torch.randn(30, 70, generator=g).to(DEVICE)
    r_buf = torch.randn(19, 45, generator=g).to(DEVICE)
    x, w, r = x_buf[:, 3:43], w_buf[:, 5:45], r_buf[:, :30]
    b = torch.randn(30, generator=g).to(DEVICE)
    y = linear(x, w, b, activation="quick_gelu", residual=r)
    torch.testing.assert_close(y, ops.linear(x, w, b, activation="quick_gelu", residual=r), **FP32_TOL)


def test_zero_rows_and_zero_k():
    w = torch.randn(8, 16, device=DEVICE)
    assert linear(torch.empty(0, 16, device=DEVICE), w).shape == (0, 8)
    b = torch.randn(8, device=DEVICE)
    y = linear(torch.empty(3, 0, device=DEVICE), torch.empty(8, 0, device=DEVICE), b, activation="gelu")
    torch.testing.assert_close(y, ops.gelu(b).expand(3, 8), **FP32_TOL)


def test_fp32_precision_follows_torch_tf32_switch():
    flag = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert linear_module._input_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert linear_module._input_precision(torch.float32) == "tf32"
        assert linear_module._input_precision(torch.float16) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def test_autotune_key_buckets_m():
    bucket = linear_module._m_bucket
    assert bucket(2056) == bucket(2500) == 4096
    assert bucket(1) == 1 and bucket(0) == 1
    assert bucket(4097) == 8192


# ---- validation -------------------------------------------------------------------------------


def _ok(dtype=torch.float32):
    return (torch.randn(4, 16, dtype=dtype, device=DEVICE), torch.randn(8, 16, dtype=dtype, device=DEVICE),
            torch.randn(8, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize(
    "make,exc,word",
    [
        (lambda x, w, b: linear([[1.0]], w), TypeError, "x"),
        (lambda x, w, b: linear(x.to(torch.int64), w), TypeError, "x"),
        (lambda x, w, b: linear(x, w.half()), TypeError, "weight"),
        (lambda x, w, b: linear(x, w[0]), ValueError, "weight"),
        (lambda x, w, b: linear(x, w[:, :8]), ValueError, "weight"),
        (lambda x, w, b: linear(x, w.t()), ValueError, "weight"),
        (lambda x, w, b: linear(x, w.to("meta")), ValueError, "weight"),
        (lambda x, w, b: linear(x, w, b[:4]), ValueError, "bias"),
        (lambda x, w, b: linear(x, w, b.double()), TypeError, "bias"),
        (lambda x, w, b: linear(x, w, b, residual=torch.randn(4, 9, device=DEVICE)), ValueError, "residual"),
        (lambda x, w, b: linear(x, w, b, residual=torch.randn(8, 4, device=DEVICE).t()), ValueError, "residual"),
        (lambda x, w, b: linear(x, w, b, activation="relu"), ValueError, "activation"),
        (lambda x, w, b: linear(x, w, b, activation=1), ValueError, "activation"),
        (lambda x, w, b: linear(torch.randn(16, 4, device=DEVICE).t(), w), ValueError, "x"),
        (lambda x, w, b: linear(torch.randn(3, 4, 16, device=DEVICE).transpose(0, 1), w), ValueError, "x"),
        (lambda x, w, b: linear(torch.tensor(1.0, device=DEVICE), w), ValueError, "x"),
    ],
    ids=["x-not-tensor", "x-int", "weight-dtype", "weight-1d", "weight-k", "weight-strided-cols", "weight-device",
         "bias-len", "bias-fp64", "residual-shape", "residual-strided-cols", "activation-name", "activation-type",
         "x-strided-cols", "x-not-viewable", "x-0d"],
)
def test_bad_input_names_the_argument(make, exc, word):
    x, w, b = _ok()
    with pytest.raises(exc, match=rf"\b{word}\b"):
        make(x, w, b)


# ---- GPU only ---------------------------------------------------------------------------------

ALTCLIP_SHAPES = [(2056, 4096, 1024, "gelu"), (2056, 1024, 4096, None), (2056, 3072, 1024, None),
                  (77, 4096, 1024, "quick_gelu"), (7, 100, 33, "gelu")]


@gpu
@needs_cuda
@pytest.mark.parametrize("m,n,k,activation", ALTCLIP_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_low_precision(m, n, k, activation, dtype):
    _check(_inputs(m, n, k, dtype, residual=True, seed=m), activation=activation)


@gpu
@needs_cuda
def test_gpu_fp32_precision_follows_tf32_switch():
    """IEEE by default (matches an fp64 answer to fp32 rounding); TF32 only when torch's switch is on,
    and then visibly less exact (10-bit mantissa products)."""
    inp = _inputs(300, 200, 512, torch.float32, residual=True, seed=1)
    x, w, b, r = (inp[k].double() for k in ("x", "weight", "bias", "residual"))
    pre = F.linear(x, w, b)
    ref = 0.5 * pre * (1.0 + torch.erf(pre / math.sqrt(2.0))) + r
    flag = torch.backends.cuda.matmul.allow_tf32
    errors = {}
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            errors[tf32] = (_run(inp, "gelu").double() - ref).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag
    assert errors[False] < 1e-4, errors
    assert errors[True] < 2e-2, errors
    assert errors[True] > 4 * errors[False], errors


@gpu
@needs_cuda
def test_gpu_torch_compile_fullgraph():
    inp = _inputs(0, 3072, 1024, torch.float16, residual=True, lead=(4, 257), seed=2)

    @torch.compile(fullgraph=True)
    def mlp(x, w, b, r):
        return linear(x, w, b, activation="gelu", residual=r) * 0.5

    y = mlp(inp["x"], inp["weight"], inp["bias"], inp["residual"])
    # Inductor autotunes user kernels itself and may pick another tile (another summation order) than
    # the eager autotuner, so the two agree to fp16 rounding, not bit for bit.
    torch.testing.assert_close(y, _run(inp, "gelu") * 0.5, atol=2e-2, rtol=1e-2)
