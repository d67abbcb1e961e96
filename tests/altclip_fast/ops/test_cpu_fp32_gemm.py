"""Which library runs fp32 GEMMs on CPU (altclip_fast/ops/cpu_fp32_gemm.py): the switch, the measured
choice, and the upcast half GEMMs following it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import altclip_fast.ops as dispatch
from altclip_fast.ops import cpu_fp32_gemm, onednn

needs_onednn = pytest.mark.skipif(not onednn.fused_linear_works(torch.float32),
                                  reason="oneDNN's fused linear is unavailable in this torch build")


@pytest.fixture
def fresh_choice():
    cpu_fp32_gemm._measured_winner.cache_clear()
    yield
    cpu_fp32_gemm._measured_winner.cache_clear()


def test_the_mode_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_fp32_gemm.ENV_VAR, "BLAS")
    assert dispatch.get_ops("torch").cpu_fp32_gemm == "blas"
    assert dispatch.get_ops("torch", cpu_fp32_gemm="onednn").cpu_fp32_gemm == "onednn"
    monkeypatch.setenv(cpu_fp32_gemm.ENV_VAR, "mkl")
    with pytest.raises(ValueError, match=cpu_fp32_gemm.ENV_VAR):
        dispatch.get_ops("torch")


def test_measure_times_both_libraries():
    times = cpu_fp32_gemm.measure(reps=1)
    assert set(times) == {"onednn", "blas"}
    assert all(0 < t < 10 and math.isfinite(t) for t in times.values())


@needs_onednn
@pytest.mark.parametrize("winner", ["onednn", "blas"])
def test_auto_follows_the_measurement(winner, monkeypatch, fresh_choice):
    calls = []
    fake = {"onednn": 1e-3, "blas": 2e-3} if winner == "onednn" else {"onednn": 2e-3, "blas": 1e-3}
    monkeypatch.setattr(cpu_fp32_gemm, "measure", lambda: calls.append(1) or fake)
    assert cpu_fp32_gemm.fp32_uses_onednn("auto") == (winner == "onednn")
    assert cpu_fp32_gemm.fp32_uses_onednn("auto") == (winner == "onednn")
    assert calls == [1]  # measured once per process (and thread count), not per model or GEMM
    # A forced mode never measures.
    assert cpu_fp32_gemm.fp32_uses_onednn("blas") is False
    assert cpu_fp32_gemm.fp32_uses_onednn("onednn") is True
    assert calls == [1]


def test_without_onednn_fp32_stays_on_blas(monkeypatch, fresh_choice):
    monkeypatch.setattr(onednn, "fused_linear_works", lambda dtype: False)
    monkeypatch.setattr(cpu_fp32_gemm, "measure", lambda: pytest.fail("nothing to measure"))
    assert not cpu_fp32_gemm.fp32_uses_onednn("onednn")
    assert not cpu_fp32_gemm.fp32_uses_onednn("auto")


class _Spy:
    """oneDNN's fused linear, recording the dtype of each call's input."""

    def __init__(self):
        self.real, self.calls = onednn.fused_linear(), []

    def __call__(self, *args):
        self.calls.append(args[0].dtype)
        return self.real(*args)

    def binary(self, *args):
        self.calls.append(args[0].dtype)
        return self.real.binary(*args)


def _spy(monkeypatch):
    spy = _Spy()
    monkeypatch.setattr(onednn, "fused_linear", lambda: spy)
    return spy.calls


@needs_onednn
@pytest.mark.parametrize("library", ["onednn", "blas"])
@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu", "silu"])
@pytest.mark.parametrize("residual", [False, True])
def test_fp32_linear_on_either_library(library, activation, residual, monkeypatch):
    calls = _spy(monkeypatch)
    ops = dispatch.get_ops("torch", cpu_fp32_gemm=library)
    gen = torch.Generator().manual_seed(0)
    x, w, b, r = (torch.randn(*s, generator=gen) for s in ((37, 96), (160, 96), (160,), (37, 160)))
    w = w / 10
    act = {None: lambda t: t, "gelu": F.gelu, "silu": F.silu, "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}
    want = act[activation](F.linear(x.double(), w.double(), b.double())) + (r.double() if residual else 0)
    with torch.no_grad():
        got = ops.linear(x, w, b, activation=activation, residual=r if residual else None)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    # oneDNN runs it unless asked for BLAS, or unless it cannot fuse both an activation and a residual.
    assert bool(calls) == (library == "onednn" and not (activation and residual))


@needs_onednn
@pytest.mark.parametrize("library", ["onednn", "blas"])
def test_upcast_half_gemms_run_on_the_chosen_fp32_library(library, monkeypatch):
    calls = _spy(monkeypatch)
    ops = dispatch.get_ops("torch", cpu_half_gemm="fp32", cpu_fp32_gemm=library)
    gen = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*s, generator=gen).to(torch.bfloat16) for s in ((64, 96), (160, 96), (160,)))
    with torch.no_grad():
        got = ops.linear(x, w, b, activation="gelu")
    want = F.gelu(F.linear(x.double(), w.double(), b.double())).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    step = torch.finfo(torch.bfloat16).eps * want.double().abs().clamp_min(1.0)
    assert ((got.double() - want.double()).abs() <= step).all()
    assert calls == ([torch.float32] if library == "onednn" else [])
