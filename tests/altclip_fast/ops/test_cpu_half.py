"""Half-precision GEMMs on a CPU without instructions for them: from ``UPCAST_FROM_ROWS`` rows on they
run in fp32 on exactly upcast operands and round once; below, and on CPUs that have the instructions,
they stay on the half-precision path. The model's own parity in both modes is test_model_lowp.py's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import altclip_fast.ops as dispatch
import altclip_fast.ops.torch_backend as tb
from altclip_fast.modeling import model as fast
from altclip_fast.modeling.checkpoint import canonicalize_keys
from altclip_fast.ops import cpu_half, onednn
from tests.checkpoints import random_hf_model, tiny_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
ROWS = cpu_half.UPCAST_FROM_ROWS


def test_native_instructions_are_read_from_the_cpu_flags():
    xeon_without_bf16 = frozenset({"avx512f", "avx512bw", "avx512_vnni"})
    assert not cpu_half.native_gemm(torch.bfloat16, xeon_without_bf16)
    assert not cpu_half.native_gemm(torch.float16, xeon_without_bf16)
    assert cpu_half.native_gemm(torch.bfloat16, xeon_without_bf16 | {"avx512_bf16"})
    assert cpu_half.native_gemm(torch.bfloat16, xeon_without_bf16 | {"amx_bf16", "amx_tile"})
    assert not cpu_half.native_gemm(torch.float16, xeon_without_bf16 | {"amx_bf16"})
    assert cpu_half.native_gemm(torch.float16, xeon_without_bf16 | {"avx512_fp16"})
    assert cpu_half.native_gemm(torch.bfloat16, frozenset({"fp", "asimd", "bf16"}))  # Arm's "Features"
    assert cpu_half.native_gemm(torch.float16, frozenset({"fp", "asimd", "asimdhp"}))
    assert cpu_half.native_gemm(torch.bfloat16, frozenset())  # flags unreadable: leave GEMMs as they were


def test_which_gemms_upcast(monkeypatch):
    monkeypatch.setattr(cpu_half, "cpu_flags", lambda: frozenset({"avx512f"}))
    assert cpu_half.upcasts("auto", CPU, torch.bfloat16) and cpu_half.upcasts("auto", CPU, torch.float16)
    assert not cpu_half.upcasts("auto", CPU, torch.float32)
    assert not cpu_half.upcasts("auto", CUDA, torch.bfloat16)
    assert not cpu_half.upcasts("native", CPU, torch.bfloat16)
    monkeypatch.setattr(cpu_half, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert not cpu_half.upcasts("auto", CPU, torch.bfloat16)
    assert cpu_half.upcasts("auto", CPU, torch.float16)
    assert cpu_half.upcasts("fp32", CPU, torch.bfloat16)


def test_the_mode_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_half.ENV_VAR, " FP32 ")
    assert dispatch.get_ops("torch").cpu_half_gemm == "fp32"
    assert dispatch.get_ops("torch", cpu_half_gemm="native").cpu_half_gemm == "native"
    monkeypatch.setenv(cpu_half.ENV_VAR, "bf16")
    with pytest.raises(ValueError, match="ALTCLIP_FAST_CPU_HALF_GEMM must be one of auto, native, fp32"):
        dispatch.get_ops("torch")


def _operands(rows, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 96, generator=gen)
    w = torch.randn(160, 96, generator=gen) / 10
    b = torch.randn(160, generator=gen)
    r = torch.randn(rows, 160, generator=gen)
    return tuple(t.to(dtype) for t in (x, w, b, r))


@pytest.fixture
def upcast_calls(monkeypatch):
    calls = []
    real = tb.upcast_linear
    monkeypatch.setattr(tb, "upcast_linear", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu", "silu"])
def test_an_upcast_gemm_is_fp32_math_rounded_once(dtype, activation, upcast_calls):
    ops = dispatch.get_ops("torch", cpu_half_gemm="fp32")
    x, w, b, r = _operands(ROWS + 5, dtype)
    y = F.linear(x.double(), w.double(), b.double())
    act = {None: lambda t: t, "gelu": F.gelu, "silu": F.silu, "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}
    want = (act[activation](y) + r.double()).to(dtype)  # exact math, one rounding
    with torch.no_grad():
        got = ops.linear(x, w, b, activation=activation, residual=r)
    assert upcast_calls == [ROWS + 5]
    assert got.dtype == dtype
    # fp32 arithmetic may move a value across a rounding boundary of the half dtype: at most one step.
    step = torch.finfo(dtype).eps * want.double().abs().clamp_min(1.0)
    assert ((got.double() - want.double()).abs() <= step).all()


@pytest.mark.parametrize("rows", [1, ROWS - 1])
def test_few_rows_stay_on_the_half_precision_path(rows, upcast_calls):
    x, w, b, r = _operands(rows, torch.bfloat16)
    with torch.no_grad():
        got = dispatch.get_ops("torch", cpu_half_gemm="fp32").linear(x, w, b, residual=r)
        want = dispatch.get_ops("torch", cpu_half_gemm="native").linear(x, w, b, residual=r)
    assert upcast_calls == []
    assert torch.equal(got, want)


def test_native_mode_never_upcasts(upcast_calls):
    x, w, b, _ = _operands(4 * ROWS, torch.bfloat16)
    with torch.no_grad():
        dispatch.get_ops("torch", cpu_half_gemm="native").linear(x, w, b, activation="gelu")
    assert upcast_calls == []


def test_an_upcasting_model_derives_no_copies(monkeypatch):
    """Pre-blocked and folded weights serve the oneDNN half path only; where GEMMs upcast they would
    be memory for nothing."""
    config = tiny_config()
    canonical = canonicalize_keys(random_hf_model(config, seed=3).state_dict())
    monkeypatch.setenv(cpu_half.ENV_VAR, "fp32")
    upcasting = fast.AltCLIPModel.from_state_dict(config, canonical, dtype="bf16", backend="torch")
    assert upcasting.derived_nbytes() == 0
    if onednn.fused_linear_works(torch.bfloat16):
        monkeypatch.setenv(cpu_half.ENV_VAR, "native")
        native = fast.AltCLIPModel.from_state_dict(config, canonical, dtype="bf16", backend="torch")
        assert native.derived_nbytes() > 0
