"""altclip_fast.ops: backend selection, each torch-backend op against reference.ops (fp32, both the
oneDNN-fused path and the plain fallback), and the prepare step's derived forms. The Triton backend's
ops are the kernels, tested in tests/kernels; here only how the model reaches them."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import altclip_fast.ops as dispatch
from altclip_fast.ops import gemm_choice, onednn
from altclip_fast.ops.torch_backend import TorchOps
from altclip_fast.modeling.layers import EncoderLayer
from altclip_fast.reference import ops as ref

ATOL, RTOL = 2e-5, 2e-5


@pytest.fixture(params=["fused", "plain"])
def torch_ops(request, monkeypatch):
    """The torch backend with oneDNN's fused GEMM (where this CPU has it) and with plain F.linear."""
    ops = TorchOps("native")  # the oneDNN path itself; the fp32 upcast is test_cpu_half.py's
    if request.param == "plain":
        monkeypatch.setattr(TorchOps, "_onednn", staticmethod(lambda device, dtype: False))
    elif onednn.fused_linear_works(torch.float32):
        # Forced for fp32 too (where the model fuses fp32 only if oneDNN is the faster library here).
        monkeypatch.setattr(TorchOps, "_onednn", staticmethod(lambda device, dtype: device.type == "cpu"))
    else:
        pytest.skip("oneDNN fused linear unavailable here")
    return ops


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- backend selection


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend(None, "cpu") == "torch"
    assert dispatch.resolve_backend(None, torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "Triton")
    assert dispatch.resolve_backend(None, "cpu") == "triton"
    assert dispatch.resolve_backend("torch", "cpu") == "torch"  # the argument wins over the variable
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.resolve_backend("auto", "cpu") == "torch"


def test_bad_backend_names_say_where_they_came_from(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend("cuda", "cpu")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.resolve_backend(None, "cpu")
    with pytest.raises(ValueError):
        dispatch.get_ops("auto")


def test_triton_backend_refuses_cpu_tensors_for_compiled_kernels(monkeypatch):
    ops = dispatch.get_ops("triton")
    ops.kernels  # imported first: the kernels exist, and were defined for the interpreter
    monkeypatch.setattr(importlib.import_module("altclip_fast.kernels._runtime"), "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.layer_norm(torch.zeros(2, 4), torch.ones(4), torch.zeros(4), 1e-5)


_TRITON_ON_CPU = """
import os, torch
from altclip_fast.ops import get_ops
ops = get_ops("triton")
x, w = torch.randn(5, 32), torch.randn(16, 32)
torch.testing.assert_close(ops.linear(x, w, activation="quick_gelu"), torch.nn.functional.linear(x, w) * torch.sigmoid(1.702 * torch.nn.functional.linear(x, w)), atol=1e-5, rtol=1e-5)
import altclip_fast.kernels._runtime as runtime
assert runtime.INTERPRETED
print(repr(os.environ.get("TRITON_INTERPRET")))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter path of a machine without CUDA")
@pytest.mark.parametrize("before", [None, "0"])
def test_triton_backend_leaves_triton_interpret_as_it_was(before):
    """Using the Triton backend on CPU defines the kernels for the interpreter without changing the
    process's TRITON_INTERPRET (a fresh process: this suite sets the variable itself)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if before is not None:
        env["TRITON_INTERPRET"] = before
    done = subprocess.run([sys.executable, "-c", _TRITON_ON_CPU], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter path of a machine without CUDA")
def test_triton_backend_after_triton_was_imported_compiled_says_what_to_do():
    """transformers imports Triton with the interpreter off; interpreted kernels then cannot call
    Triton's own compiled helpers (tl.cdiv), which used to fail deep inside the interpreter."""
    pytest.importorskip("triton")
    code = "import triton.language\n" + _TRITON_ON_CPU
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError:") and "Set TRITON_INTERPRET=1 in the environment" in last, last
    # With the variable set from the start, the same code runs.
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_gemm_mode_is_read_when_the_op_set_is_made(monkeypatch):
    monkeypatch.setenv(gemm_choice.ENV_VAR, "torch")
    ops = dispatch.get_ops("triton")
    assert ops.gemm == "torch" and dispatch.get_ops("triton", gemm="auto").gemm == "auto"
    monkeypatch.setenv(gemm_choice.ENV_VAR, "cutlass")
    assert ops.gemm == "torch"  # an op set keeps its mode
    with pytest.raises(ValueError, match="ALTCLIP_FAST_GEMM"):
        dispatch.get_ops("triton")


# --------------------------------------------------------------------------- torch ops vs reference.ops


@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu", "silu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_linear(torch_ops, activation, with_residual):
    x, w, b = rand(13, 40, seed=1), rand(24, 40, seed=2) / 6, rand(24, seed=3)
    residual = rand(13, 24, seed=4) if with_residual else None
    got = torch_ops.linear(x, w, b, activation=activation, residual=residual)
    if activation == "silu":
        want = torch.nn.functional.silu(ref.linear(x, w, b))
        want = want + residual if with_residual else want
    else:
        want = ref.linear(x, w, b, activation=activation, residual=residual)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="activation"):
        torch_ops.linear(x, w, b, activation="relu")


def test_layer_norms(torch_ops):
    x, r, b = rand(9, 33, seed=1), rand(9, 33, seed=2), rand(33, seed=3)
    g, beta = 1 + rand(33, seed=4) / 5, rand(33, seed=5)
    want_y, want_sum = ref.add_layer_norm(x, g, beta, residual=r, eps=1e-5)
    y, total = torch_ops.add_layer_norm(x, r, g, beta, 1e-5, return_sum=True)
    torch.testing.assert_close(y, want_y, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(total, want_sum, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch_ops.layer_norm(x, g, beta, 1e-5), ref.add_layer_norm(x, g, beta)[0])
    # LayerNorm(x @ w.T + b + residual): the post-LN sub-block end, and the pre-LN residual stream.
    w = rand(33, 20, seed=6) / 5
    h = rand(9, 20, seed=7)
    want_y, want_sum = ref.add_layer_norm(ref.linear(h, w), g, beta, residual=r, x_bias=b, eps=1e-6)
    y, total = torch_ops.linear_add_layer_norm(h, w, b, r, g, beta, 1e-6, return_sum=True)
    torch.testing.assert_close(y, want_y, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(total, want_sum, atol=ATOL, rtol=RTOL)


def test_packed_attention_equals_per_sequence_attention(torch_ops):
    heads, head_dim = 3, 16
    lengths = [5, 1, 9, 4]
    keep = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    layout = dispatch.PackedLayout.from_mask(keep)
    assert layout.cu_seqlens.tolist() == [0, 5, 6, 15, 19] and layout.cu_seqlens.dtype == torch.int32
    qkv = rand(sum(lengths), 3 * heads * head_dim, seed=8)
    q, k, v = qkv.view(-1, 3, heads, head_dim).unbind(1)
    want = ref.attention_varlen(q, k, v, layout.cu_seqlens).reshape(len(qkv), -1)
    torch.testing.assert_close(torch_ops.attention(qkv, heads, layout), want, atol=ATOL, rtol=RTOL)
    # Twice through the same layout (the grid is reused across layers): same answer.
    torch.testing.assert_close(torch_ops.attention(qkv * 0.5, heads, layout),
                               ref.attention_varlen(q * 0.5, k * 0.5, v * 0.5, layout.cu_seqlens).reshape(len(qkv), -1),
                               atol=ATOL, rtol=RTOL)


def test_padded_and_explicit_attention(torch_ops):
    heads, head_dim, batch, seq = 2, 20, 3, 7
    keep = torch.arange(seq)[None] < torch.tensor([7, 3, 5])[:, None]
    layout = dispatch.PaddedLayout(batch, seq, keep)
    qkv = rand(batch * seq, 3 * heads * head_dim, seed=9)
    q, k, v = qkv.view(batch, seq, 3, heads, head_dim).unbind(2)
    want = ref.attention(q, k, v, key_padding_mask=keep).reshape(batch * seq, -1)
    torch.testing.assert_close(torch_ops.attention(qkv, heads, layout), want, atol=ATOL, rtol=RTOL)
    out, probs = dispatch.explicit_attention(qkv, heads, layout)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL)
    assert probs.shape == (batch, heads, seq, seq)
    torch.testing.assert_close(probs.sum(-1), torch.ones(batch, heads, seq))
    assert (probs[1, :, :, 3:] == 0).all()  # padded keys get no weight


def _to_cuda(layout):
    if isinstance(layout, dispatch.PackedLayout):
        return dispatch.PackedLayout.from_mask(layout.grid.key_padding_mask.cuda())
    return dispatch.PaddedLayout(layout.batch, layout.seqlen, layout.key_padding_mask.cuda())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("packed", [False, True])
def test_query_attention_is_full_attention_at_one_row_per_sequence(monkeypatch, backend, packed):
    """One query per sequence (any of its rows) over all its keys: what full attention gives that row."""
    ops = dispatch.get_ops(backend)
    heads, head_dim, lengths = 2, 16, [5, 1, 9, 4]
    keep = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    if packed:
        layout = dispatch.PackedLayout.from_mask(keep)
        rows = layout.cu_seqlens[:-1].long() + torch.tensor([4, 0, 3, 1])  # not only first tokens
    else:
        keep[1] = keep[1].flip(0)  # a left-padded row: its row 0 is a pad, still given a query
        layout = dispatch.PaddedLayout(4, 9, keep)
        rows = torch.arange(4) * 9 + torch.tensor([0, 0, 8, 2])
    hidden = heads * head_dim
    qkv = rand(layout.num_tokens, 3 * hidden, seed=10)
    if backend == "triton" and torch.cuda.is_available():  # compiled kernels take CUDA tensors only
        qkv, rows, layout = qkv.cuda(), rows.cuda(), _to_cuda(layout)
    want = ops.attention(qkv, heads, layout).index_select(0, rows)
    got = ops.query_attention(qkv[rows, :hidden].contiguous(), qkv[:, hidden:].contiguous(), heads, layout)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_folded_quick_gelu_mlp_is_quick_gelu(torch_ops):
    """Folding quick_gelu into SiLU (fc1 * 1.702, fc2.weight / 1.702) changes nothing but speed, and
    leaves the parameters alone."""
    torch.manual_seed(0)
    layer = EncoderLayer(32, 2, 50, eps=1e-5, activation="quick_gelu", pre_norm=True).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = rand(2 * 6, 32, seed=10)
    layout = dispatch.PaddedLayout(2, 6)
    fold = _Fold(torch_ops)
    with torch.no_grad():
        plain, _ = layer(x, layout, torch_ops)  # never prepared: runs the parameters
        layer.prepare(fold)
        assert layer.prepared["fc2.weight"] is not layer.fc2.weight and layer.derived_nbytes() > 0
        folded, _ = layer(x, layout, fold)
        layer.prepare(None)
        assert layer.derived_nbytes() == 0
        restored, _ = layer(x, layout, torch_ops)
    torch.testing.assert_close(folded, plain, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(restored, plain, atol=ATOL, rtol=RTOL)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


class _Fold:
    """The torch ops with their prepare step switched on for fp32, so prepare_mlp folds (and only that:
    no pre-blocking; the model itself derives neither in fp32)."""

    def __init__(self, ops):
        self._ops = ops

    def prepare_mlp(self, *args, **kwargs):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(TorchOps, "_prepares", lambda self, device, dtype: True)
            return self._ops.prepare_mlp(*args, **kwargs)

    def prepare_weight(self, weight):
        return weight

    def __getattr__(self, name):
        return getattr(self._ops, name)


@pytest.mark.skipif(not onednn.prepack_works(torch.bfloat16), reason="oneDNN bf16 weight prepacking unavailable")
def test_prepacked_weights_give_the_plain_weights_answer():
    """The prepare step's oneDNN-blocked copy computes exactly what the plain weight does, and lives
    nowhere on the weight itself."""
    ops = dispatch.get_ops("torch", cpu_half_gemm="native")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=gen).to(torch.bfloat16)
    w = torch.randn(48, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(48, generator=gen).to(torch.bfloat16)
    packed = ops.prepare_weight(w)
    assert onednn.is_prepacked(packed) and not vars(w)
    with torch.no_grad():
        want = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], None)
        assert torch.equal(ops.linear(x, packed, b), want)
        assert torch.equal(ops.linear(x, w, b), want)
        assert torch.equal(ops.linear(x, packed, b, residual=want), ops.linear(x, w, b, residual=want))
    assert torch.equal(packed.to_dense(), w)


@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu"])
def test_triton_backend_with_torch_gemms(monkeypatch, activation):
    """ALTCLIP_FAST_GEMM=torch: the Triton backend's GEMMs run in torch, its LayerNorm stays a kernel."""
    ops = dispatch.get_ops("triton", gemm="torch")
    calls = []
    monkeypatch.setattr(ops.kernels, "linear", lambda *a, **k: calls.append("linear"))
    real_ln = ops.kernels.add_layer_norm
    monkeypatch.setattr(ops.kernels, "add_layer_norm", lambda *a, **k: calls.append("ln") or real_ln(*a, **k))
    x, w, b, r = rand(13, 40, seed=1), rand(24, 40, seed=2) / 6, rand(24, seed=3), rand(13, 24, seed=4)
    if torch.cuda.is_available():  # compiled kernels take CUDA tensors only
        x, w, b, r = x.cuda(), w.cuda(), b.cuda(), r.cuda()
    got = ops.linear(x, w, b, activation=activation, residual=r)
    torch.testing.assert_close(got, ref.linear(x, w, b, activation=activation, residual=r), atol=ATOL, rtol=RTOL)
    g, beta = 1 + rand(24, seed=5) / 5, rand(24, seed=6)
    y = ops.linear_add_layer_norm(x, w, b, r, g, beta, 1e-5)
    torch.testing.assert_close(y, ref.add_layer_norm(ref.linear(x, w), g, beta, residual=r, x_bias=b)[0],
                               atol=ATOL, rtol=RTOL)
    assert calls == ["ln"]  # no Triton GEMM ran


@pytest.mark.parametrize("k,padded", [(147, 192), (588, 640), (64, 64), (48, 48)])
def test_triton_prepare_pads_unaligned_rows_and_linear_takes_either_width(k, padded):
    """Rows not a multiple of 16 elements get zero columns up to a multiple of 64 (aligned ones are kept
    as they are); the GEMM gives the same answer from x as it is or from x already padded."""
    pytest.importorskip("triton")
    ops = dispatch.get_ops("triton")
    w, x, bias = rand(24, k, seed=1), rand(5, k, seed=2), rand(24, seed=3)
    prepared = ops.prepare_weight(w)
    assert prepared.shape == (24, padded)
    assert (prepared is w) == (k == padded)
    want = ref.linear(x, w, bias)
    torch.testing.assert_close(ops.linear(x, prepared, bias), want, atol=ATOL, rtol=RTOL)
    wide = torch.nn.functional.pad(x, (0, padded - k))
    torch.testing.assert_close(ops.linear(wide, prepared, bias), want, atol=ATOL, rtol=RTOL)
