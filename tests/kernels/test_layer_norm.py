"""kernels.add_layer_norm against reference.ops.add_layer_norm.

Without CUDA these run under Triton's interpreter on CPU tensors (tests/conftest.py). Low precision
uses the three-way rule: the kernel's error against the fp32 reference is at most twice plain
torch's error in the same dtype, plus a small atol.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from altclip_fast.kernels import add_layer_norm
from altclip_fast.reference import ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

FP32_TOL = dict(atol=2e-5, rtol=1e-5)
LOW_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _inputs(rows, n, dtype, *, x_bias=True, residual=True, bias=True, param_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def rand(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    x = rand(rows, n)
    return dict(
        x=x,
        weight=(1.0 + rand(n, dt=param_dtype, scale=0.2)),
        bias=rand(n, dt=param_dtype, scale=0.2) if bias else None,
        residual=rand(rows, n, scale=2.0) if residual else None,
        x_bias=rand(n, dt=param_dtype, scale=0.5) if x_bias else None,
    )


def _reference(inp, eps=1e-5):
    """The fp32 answer for the (already rounded) inputs."""
    up = {k: (v.float() if v is not None else None) for k, v in inp.items()}
    return ops.add_layer_norm(up["x"], up["weight"], up["bias"], residual=up["residual"], x_bias=up["x_bias"], eps=eps)


def _torch_same_dtype(inp, eps=1e-5):
    """What plain torch computes in the input dtype: rounded adds, then F.layer_norm."""
    x = inp["x"]
    s = x
    if inp["x_bias"] is not None:
        s = s + inp["x_bias"].to(x.dtype)
    if inp["residual"] is not None:
        s = s + inp["residual"].to(x.dtype)
    b = inp["bias"].to(x.dtype) if inp["bias"] is not None else None
    return F.layer_norm(s, (x.shape[-1],), inp["weight"].to(x.dtype), b, eps), s


def _run(inp, eps=1e-5):
    return add_layer_norm(inp["x"], inp["weight"], inp["bias"], residual=inp["residual"], x_bias=inp["x_bias"],
                          eps=eps, return_sum=True)


def _check(inp, eps=1e-5):
    y, s = _run(inp, eps)
    y_ref, s_ref = _reference(inp, eps)
    dtype = inp["x"].dtype
    assert y.dtype == dtype and s.dtype == dtype
    assert y.shape == inp["x"].shape and s.shape == inp["x"].shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, **FP32_TOL)
        torch.testing.assert_close(s, s_ref, **FP32_TOL)
        return
    y_torch, s_torch = _torch_same_dtype(inp, eps)
    atol = LOW_ATOL[dtype]
    for name, out, ref, base in (("y", y, y_ref, y_torch), ("sum", s, s_ref, s_torch)):
        err = (out.float() - ref.float()).abs().max().item()
        torch_err = (base.float() - ref.float()).abs().max().item()
        assert err <= 2 * torch_err + atol, f"{name}: kernel error {err:.3g} vs torch {dtype} error {torch_err:.3g}"


# Hidden sizes from the issue; rows chosen so each size stays cheap in the interpreter (one 8192-wide
# row is as costly as many narrow ones).
SHAPES = [(1, 16), (7, 40), (257, 100), (7, 768), (3, 1000), (2, 1024), (1, 8192), (257, 16), (7, 1)]


@pytest.mark.parametrize("rows,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_reference_all_inputs(rows, n, dtype):
    _check(_inputs(rows, n, dtype))


@pytest.mark.parametrize("x_bias,residual,bias", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("return_sum", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_every_flag_combination(x_bias, residual, bias, return_sum, dtype):
    inp = _inputs(7, 100, dtype, x_bias=x_bias, residual=residual, bias=bias, seed=3)
    out = add_layer_norm(inp["x"], inp["weight"], inp["bias"], residual=inp["residual"], x_bias=inp["x_bias"],
                         return_sum=return_sum)
    if return_sum:
        assert isinstance(out, tuple) and len(out) == 2
    else:
        assert isinstance(out, torch.Tensor)
    _check(inp)


@pytest.mark.parametrize("rows,n", [(7, 100), (257, 40), (2, 1024)])
def test_bf16(rows, n):
    """bf16 runs in the interpreter too (only bf16 tl.dot is wrong there, and this kernel has none)."""
    _check(_inputs(rows, n, torch.bfloat16, seed=rows * n))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_parameters_with_low_precision_activations(dtype):
    _check(_inputs(7, 100, dtype, param_dtype=torch.float32, seed=5))


def test_fp32_residual_with_fp16_x():
    inp = _inputs(5, 64, torch.float16, seed=6)
    inp["residual"] = inp["residual"].float() + 0.001  # not representable in fp16: must be read as fp32
    _check(inp)


def test_post_ln_pattern_equals_dense_bias_residual():
    """LN(dense_out + dense_bias + residual), the text tower's post-LN step, as torch writes it."""
    inp = _inputs(7, 96, torch.float32, seed=7)
    y = add_layer_norm(inp["x"], inp["weight"], inp["bias"], residual=inp["residual"], x_bias=inp["x_bias"])
    expected = F.layer_norm(inp["x"] + inp["x_bias"] + inp["residual"], (96,), inp["weight"], inp["bias"], 1e-5)
    torch.testing.assert_close(y, expected, **FP32_TOL)


def test_pre_ln_pattern_returns_residual_stream():
    """h = h + attn_out; y = LN2(h): the sum output is the new h, exactly."""
    inp = _inputs(7, 96, torch.float32, x_bias=False, seed=8)
    y, h = add_layer_norm(inp["x"], inp["weight"], inp["bias"], residual=inp["residual"], return_sum=True)
    torch.testing.assert_close(h, inp["residual"] + inp["x"], atol=0, rtol=0)
    torch.testing.assert_close(y, F.layer_norm(h, (96,), inp["weight"], inp["bias"], 1e-5), **FP32_TOL)


def test_leading_dims_are_flattened():
    inp = _inputs(2 * 3 * 5, 48, torch.float32, seed=9)
    shaped = {k: (v.view(2, 3, 5, 48) if k in ("x", "residual") else v) for k, v in inp.items()}
    y, s = _run(shaped)
    assert y.shape == (2, 3, 5, 48)
    y_flat, s_flat = _run(inp)
    torch.testing.assert_close(y.view(-1, 48), y_flat, atol=0, rtol=0)
    torch.testing.assert_close(s.view(-1, 48), s_flat, atol=0, rtol=0)


def test_one_dimensional_input_is_one_row():
    inp = _inputs(1, 40, torch.float32, seed=10)
    one = {k: (v[0] if k in ("x", "residual") else v) for k, v in inp.items()}
    y, _ = _run(one)
    assert y.shape == (40,)
    torch.testing.assert_close(y, _reference(inp)[0][0], **FP32_TOL)


def test_strided_rows_need_no_copy():
    """The CLS token of each sequence, h[:, 0], is a 2-D view with a row stride of seq * hidden."""
    g = torch.Generator().manual_seed(11)
    h = torch.randn(4, 9, 40, generator=g).to(DEVICE)
    w, b = torch.randn(40, generator=g).to(DEVICE), torch.randn(40, generator=g).to(DEVICE)
    cls = h[:, 0]
    assert not cls.is_contiguous()
    torch.testing.assert_close(add_layer_norm(cls, w, b), F.layer_norm(cls.contiguous(), (40,), w, b), **FP32_TOL)


def test_large_mean_rows_keep_precision():
    """A row riding on a large offset: E[x^2] - E[x]^2 in fp32 would lose the variance entirely."""
    g = torch.Generator().manual_seed(12)
    x = (1e4 + torch.randn(3, 256, generator=g)).to(DEVICE)
    w, b = torch.ones(256, device=DEVICE), torch.zeros(256, device=DEVICE)
    y = add_layer_norm(x, w, b)
    expected = F.layer_norm(x.double(), (256,), w.double(), b.double(), 1e-5).float()
    torch.testing.assert_close(y, expected, atol=1e-3, rtol=1e-3)


def test_large_mean_from_the_residual_normalises_each_row():
    """A second, reference-free check of the variance: the large mean arrives through the residual and
    x_bias adds (the post-LN pattern), and each output row must have mean 0 and variance 1."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(5, 192, generator=g).to(DEVICE)
    residual = torch.full((5, 192), 3e3).to(DEVICE)
    x_bias = torch.full((192,), 250.0).to(DEVICE)
    w, b = torch.ones(192, device=DEVICE), torch.zeros(192, device=DEVICE)
    y, s = add_layer_norm(x, w, b, residual=residual, x_bias=x_bias, return_sum=True)
    torch.testing.assert_close(s, x + x_bias + residual, **FP32_TOL)
    y = y.double()
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(5, dtype=torch.float64, device=DEVICE), atol=1e-3, rtol=0)
    torch.testing.assert_close(y.var(dim=1, unbiased=False), torch.ones(5, dtype=torch.float64, device=DEVICE),
                               atol=2e-3, rtol=0)


@pytest.mark.parametrize("eps", [1e-12, 1e-5, 0.1])
def test_eps_is_honoured(eps):
    inp = _inputs(3, 64, torch.float32, seed=13)
    inp["x"] = inp["x"] * 0.01  # variance near eps, so eps matters
    inp["residual"] = None
    _check(inp, eps=eps)


def test_zero_rows():
    w = torch.ones(32, device=DEVICE)
    y, s = add_layer_norm(torch.empty(0, 32, device=DEVICE), w, None, return_sum=True)
    assert y.shape == (0, 32) and s.shape == (0, 32)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 40),
    n=st.integers(1, 1100),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(rows, n, dtype, flags, seed):
    x_bias, residual, bias = flags
    _check(_inputs(rows, n, dtype, x_bias=x_bias, residual=residual, bias=bias, seed=seed))


# ---- validation -------------------------------------------------------------------------------


def _ok(n=32, rows=4, dtype=torch.float32):
    return (torch.randn(rows, n, dtype=dtype, device=DEVICE), torch.ones(n, dtype=dtype, device=DEVICE),
            torch.zeros(n, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize(
    "make,exc,word",
    [
        (lambda x, w, b: add_layer_norm(x.numpy(force=True), w, b), TypeError, "x"),
        (lambda x, w, b: add_layer_norm(x.to(torch.int32), w, b), TypeError, "x"),
        (lambda x, w, b: add_layer_norm(x, w[:-1], b), ValueError, "weight"),
        (lambda x, w, b: add_layer_norm(x, w[None], b), ValueError, "weight"),
        (lambda x, w, b: add_layer_norm(x, w.double(), b), TypeError, "weight"),
        (lambda x, w, b: add_layer_norm(x, w, b[:-1]), ValueError, "bias"),
        (lambda x, w, b: add_layer_norm(x.half(), w, b.to(torch.bfloat16)), TypeError, "bias"),
        (lambda x, w, b: add_layer_norm(x, w, b, x_bias=b[:3]), ValueError, "x_bias"),
        (lambda x, w, b: add_layer_norm(x, w, b, residual=x[:2]), ValueError, "residual"),
        (lambda x, w, b: add_layer_norm(x, w, b, residual=x.t().contiguous().t()), ValueError, "residual"),
        (lambda x, w, b: add_layer_norm(x, w.to("meta"), b), ValueError, "weight"),
        (lambda x, w, b: add_layer_norm(x.t(), w[:4], b[:4]), ValueError, "x"),
        (lambda x, w, b: add_layer_norm(torch.randn(2, 3, 4, device=DEVICE).transpose(0, 1), w[:4], b[:4]),
         ValueError, "x"),
        (lambda x, w, b: add_layer_norm(x[:, :0], w[:0], b[:0]), ValueError, "x"),
        (lambda x, w, b: add_layer_norm(x, w, b, eps=-1.0), ValueError, "eps"),
    ],
    ids=["not-tensor", "int-dtype", "weight-len", "weight-2d", "weight-fp64", "bias-len", "bias-other-low-dtype",
         "x_bias-len", "residual-shape", "residual-strided-cols", "weight-device", "x-strided-cols",
         "x-not-viewable", "x-empty-last-dim", "eps-negative"],
)
def test_bad_input_names_the_argument(make, exc, word):
    x, w, b = _ok()
    with pytest.raises(exc, match=rf"\b{word}\b"):
        make(x, w, b)


def test_hidden_size_above_limit_is_refused():
    x, w, b = _ok(n=8193, rows=1)
    with pytest.raises(ValueError, match="8192"):
        add_layer_norm(x, w, b)


# ---- GPU only ---------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("rows,n", [(7, 100), (257, 1024), (2056, 1024), (3, 8192)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_low_precision(rows, n, dtype):
    _check(_inputs(rows, n, dtype, seed=rows + n))


@gpu
@needs_cuda
def test_gpu_torch_compile_fullgraph():
    inp = _inputs(64, 1024, torch.float16, seed=21)

    @torch.compile(fullgraph=True)
    def layer(x, w, b, r, xb):
        y, s = add_layer_norm(x, w, b, residual=r, x_bias=xb, return_sum=True)
        return y * 2, s

    y, s = layer(inp["x"], inp["weight"], inp["bias"], inp["residual"], inp["x_bias"])
    y_eager, s_eager = _run(inp)
    torch.testing.assert_close(y, y_eager * 2, atol=0, rtol=0)
    torch.testing.assert_close(s, s_eager, atol=0, rtol=0)
