"""The quick_gelu -> SiLU fold, checked apart from test_model_prepare's exact per-tensor comparison:
as a function in fp32 against transformers' own quick_gelu, and on the bf16 load path by estimating
each derived tensor's factor from the weights themselves. Both must reject a wrong factor on fc2
alone, and on fc1 and fc2 together."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import altclip_fast.ops.torch_backend as tb
from altclip_fast.modeling import model as fast
from altclip_fast.modeling.checkpoint import canonicalize_keys
from tests.checkpoints import random_hf_model, tiny_config

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402

CONFIG = tiny_config()


@pytest.fixture(autouse=True)
def native_half_gemms(monkeypatch):
    """The oneDNN forms are what this file checks; on a CPU without bf16 instructions the default
    ("auto") derives none (its GEMMs run in fp32: test_cpu_half.py)."""
    monkeypatch.setenv("ALTCLIP_FAST_CPU_HALF_GEMM", "native")

FOLDED = tb.TorchOps()._onednn(torch.device("cpu"), torch.bfloat16)
# transformers' quick_gelu is x * sigmoid(alpha * x): read alpha off it rather than restating it.
_q = ACT2FN["quick_gelu"](torch.tensor(1.0, dtype=torch.float64)).item()
ALPHA = math.log(_q / (1 - _q))
WRONG = {"fc2-alone": (1.702, 1.702, 1 / 1.7), "fc1-and-fc2": (1.7, 1.7, 1 / 1.7)}


@pytest.fixture(scope="module")
def canonical():
    return canonicalize_keys(random_hf_model(CONFIG, seed=11).state_dict())


def checkpoint_mlp(canonical, i):
    mapping = fast.model_key_map(CONFIG)
    get = lambda part: canonical[mapping[f"vision_model.layers.{i}.{part}"][0]]  # noqa: E731
    return get("fc1.weight"), get("fc1.bias"), get("fc2.weight"), get("fc2.bias")


def check_fp32_fold(canonical):
    """The backend's fold, run in fp32 (no rounding to hide behind), is transformers' MLP within 1e-5."""
    x = torch.randn(256, CONFIG.vision_config.hidden_size, generator=torch.Generator().manual_seed(0)) * 2
    for i in range(CONFIG.vision_config.num_hidden_layers):
        w1, b1, w2, b2 = checkpoint_mlp(canonical, i)
        fw1, fb1, fw2, act = tb.TorchOps("native").prepare_mlp(w1, b1, w2, "quick_gelu")
        assert act == "silu" and fw1.dtype == torch.float32
        want = F.linear(ACT2FN["quick_gelu"](F.linear(x, w1, b1)), w2, b2)
        got = F.linear(F.silu(F.linear(x, fw1, fb1)), fw2, b2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"layer {i}")


def dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_mkldnn else t


def factor(derived: torch.Tensor, source: torch.Tensor) -> float:
    """The least-squares scale from ``source`` to ``derived``; bf16 rounding averages out over the tensor."""
    d = dense(derived).double().flatten()
    s = source.double().flatten()
    return (d @ s / (s @ s)).item()


def check_bf16_fold_factors(canonical):
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical, dtype="bf16", backend="torch")
    for i, layer in enumerate(model.vision_model.layers):
        w1, b1, w2, _ = checkpoint_mlp(canonical, i)
        got = layer.prepared
        fc1 = factor(torch.cat([dense(got["fc1.weight"]).flatten(), got["fc1.bias"]]), torch.cat([w1.flatten(), b1]))
        fc2 = factor(got["fc2.weight"], w2)
        # silu(a x) / a is quick_gelu exactly when a is transformers' alpha.
        assert fc1 == pytest.approx(ALPHA, rel=2e-4), f"layer {i} fc1 factor {fc1}"
        assert fc2 == pytest.approx(1 / ALPHA, rel=2e-4), f"layer {i} fc2 factor {fc2}"


def test_fp32_fold_is_transformers_quick_gelu_mlp(canonical, monkeypatch):
    monkeypatch.setattr(tb.TorchOps, "_onednn", staticmethod(lambda device, dtype: True))
    monkeypatch.setattr(tb.TorchOps, "_prepares", lambda self, device, dtype: True)  # fold fp32 too
    check_fp32_fold(canonical)


@pytest.mark.skipif(not FOLDED, reason="oneDNN fused linear unavailable for bf16: no fold on this CPU")
def test_bf16_load_path_folds_by_transformers_alpha(canonical):
    check_bf16_fold_factors(canonical)


@pytest.mark.parametrize("wrong", list(WRONG), ids=list(WRONG))
def test_both_checks_reject_a_wrong_factor(canonical, monkeypatch, wrong):
    monkeypatch.setattr(tb, "QUICK_GELU_FOLD", WRONG[wrong])
    with monkeypatch.context() as m:
        m.setattr(tb.TorchOps, "_onednn", staticmethod(lambda device, dtype: True))
        m.setattr(tb.TorchOps, "_prepares", lambda self, device, dtype: True)
        with pytest.raises(AssertionError):
            check_fp32_fold(canonical)
    if FOLDED:
        with pytest.raises(AssertionError, match="factor"):
            check_bf16_fold_factors(canonical)
