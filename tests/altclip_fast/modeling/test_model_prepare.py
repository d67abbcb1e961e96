"""The prepare step: parameters always hold the checkpoint's values; the backend's derived forms
(quick_gelu folded into SiLU, weights pre-blocked for oneDNN) live beside them, are exactly the fold
formula, are counted by derived_nbytes(), and follow .to() / backend changes / load_state_dict."""

from __future__ import annotations

import pytest
import torch

from altclip_fast.modeling import model as fast
from altclip_fast.modeling.checkpoint import canonicalize_keys
from altclip_fast.ops import onednn
from altclip_fast.ops.torch_backend import TorchOps
from tests.checkpoints import make_pixels, make_text_batch, random_hf_model, tiny_config
from tests.parity import rel_err

pytest.importorskip("transformers")

CONFIG = tiny_config()


@pytest.fixture(autouse=True)
def native_half_gemms(monkeypatch):
    """The oneDNN forms are what this file checks; on a CPU without bf16 instructions the default
    ("auto") derives none (its GEMMs run in fp32: test_cpu_half.py)."""
    monkeypatch.setenv("ALTCLIP_FAST_CPU_HALF_GEMM", "native")

BF16 = torch.bfloat16
ALPHA = 1.702  # CLIP's quick_gelu constant, spelled out here independently of the library
FOLDED = TorchOps()._onednn(torch.device("cpu"), BF16)
PACKED = FOLDED and onednn.prepack_works(BF16)


@pytest.fixture(scope="module")
def canonical():
    return canonicalize_keys(random_hf_model(CONFIG, seed=5).state_dict())


@pytest.fixture(scope="module")
def batch():
    ids, mask = make_text_batch(CONFIG, [5, 9, 3, 1], seed=2)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(CONFIG, 2, seed=3))


@pytest.fixture(scope="module")
def fp32_answer(canonical, batch):
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical, backend="torch")
    return model(**batch)


def checkpoint_in(model, canonical, dtype):
    """What state_dict() must equal: each parameter's checkpoint tensors (concatenated for QKV), in ``dtype``."""
    mapping = fast.model_key_map(CONFIG)
    want = {}
    for name, sources in mapping.items():
        t = torch.cat([canonical[s] for s in sources]) if len(sources) > 1 else canonical[sources[0]]
        want[name] = t.to(dtype)
    return want


def assert_state_is_checkpoint(model, want):
    state = model.state_dict()
    assert set(state) == set(want)
    for name, tensor in state.items():
        assert tensor.dtype == want[name].dtype and torch.equal(tensor, want[name]), name


def dense(t):
    return t.to_dense() if t.is_mkldnn else t


def assert_folds(model, source_of):
    """Every vision layer's derived MLP weights are the fold formula applied to ``source_of(name)`` in
    fp32, rounded once to the model's dtype: fc1 weight and bias times ALPHA, fc2 weight times 1/ALPHA."""
    for i, layer in enumerate(model.vision_model.layers):
        got = layer.prepared
        for part, factor in (("fc1.weight", ALPHA), ("fc1.bias", ALPHA), ("fc2.weight", 1 / ALPHA)):
            want = (source_of(f"vision_model.layers.{i}.{part}").float() * factor).to(BF16)
            assert torch.equal(dense(got[part]), want), f"layer {i} {part}"
        assert torch.equal(got["fc2.bias"], layer.fc2.bias)


@pytest.mark.skipif(not FOLDED, reason="oneDNN fused linear unavailable for bf16: no fold on this CPU")
def test_bf16_parameters_stay_the_checkpoint_and_derived_forms_are_the_fold(canonical, batch, fp32_answer):
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical, dtype="bf16", backend="torch")
    want = checkpoint_in(model, canonical, BF16)
    ckpt32 = checkpoint_in(model, canonical, torch.float32)
    assert_state_is_checkpoint(model, want)
    assert_folds(model, lambda name: ckpt32[name])  # at load: from the checkpoint, rounded once
    assert model.derived_nbytes() > 0
    assert all(layer._mlp_act == "silu" for layer in model.vision_model.layers)
    assert all(layer._mlp_act == "gelu" for layer in model.text_model.layers)
    out = model(**batch)
    assert_state_is_checkpoint(model, want)  # a forward changes nothing
    assert rel_err(out.image_embeds.float(), fp32_answer.image_embeds) < 2e-2

    model.to(torch.float32)
    assert model.derived_nbytes() == 0
    assert all(layer._mlp_act == "quick_gelu" for layer in model.vision_model.layers)
    assert_state_is_checkpoint(model, {k: v.float() for k, v in want.items()})
    model.to(BF16)
    assert_state_is_checkpoint(model, want)
    # Re-derived from the current (bf16) parameters after the move.
    params = dict(model.named_parameters())
    assert_folds(model, lambda name: params[name])
    again = model(**batch)
    assert rel_err(again.image_embeds.float(), fp32_answer.image_embeds) < 2e-2
    assert rel_err(again.text_embeds.float(), fp32_answer.text_embeds) < 2e-2
    for p in model.parameters():
        assert not hasattr(p, "_altclip_fast_prepacked")


@pytest.mark.skipif(not FOLDED, reason="oneDNN fused linear unavailable for bf16: no fold on this CPU")
def test_a_wrong_fc2_factor_is_caught(canonical, monkeypatch):
    """The fold check above fails on a wrong factor for fc2 alone."""
    import altclip_fast.ops.torch_backend as tb

    monkeypatch.setattr(tb, "QUICK_GELU_FOLD", (ALPHA, ALPHA, 1 / 1.7))
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical, dtype="bf16", backend="torch")
    ckpt32 = checkpoint_in(model, canonical, torch.float32)
    with pytest.raises(AssertionError, match="fc2.weight"):
        assert_folds(model, lambda name: ckpt32[name])


@pytest.mark.skipif(not PACKED, reason="oneDNN bf16 weight prepacking unavailable")
def test_derived_bytes_count_every_prepacked_copy(canonical):
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical, dtype="bf16", backend="torch")
    layer = model.vision_model.layers[-1]
    assert all(layer.prepared[k].is_mkldnn for k in ("qkv.weight", "out.weight", "fc1.weight", "fc2.weight",
                                                     "q.weight", "kv.weight"))
    assert not model.vision_model.layers[0].prepared["q.weight"].is_mkldnn  # only the last layer needs them
    last_qkv = sum(t.layers[-1].qkv.weight.nbytes for t in (model.text_model, model.vision_model))
    folded_biases = sum(l.fc1.bias.nbytes for l in model.vision_model.layers)
    assert model.derived_nbytes() == sum(p.nbytes for p in _gemm_weights(model)) + last_qkv + folded_biases


def _gemm_weights(model) -> list[torch.Tensor]:
    """Every weight that runs as a GEMM's ``[out, in]`` operand (the patch conv's flattened)."""
    return [p.flatten(1) for n, p in model.named_parameters() if n.endswith((".weight", "patch_embedding"))
            and ("layers." in n and ("qkv" in n or "out" in n or "fc" in n)
                 or n.endswith(("transformation.weight", "projection.weight", "patch_embedding")))]


def _padded_nbytes(weight: torch.Tensor) -> int:
    """Bytes of the Triton backend's copy of a weight whose rows are not 16 elements aligned: its
    in-features padded to a multiple of 64 (0 for aligned rows, which it takes as they are)."""
    out, k = weight.shape
    return 0 if k % 16 == 0 else out * (-(-k // 64) * 64) * weight.element_size()


def test_fp32_keeps_no_derived_copies_and_triton_only_row_padding(canonical):
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical, backend="torch")
    assert model.derived_nbytes() == 0
    assert model.text_model.derived_nbytes() == model.vision_model.derived_nbytes() == 0
    model.to(BF16)
    assert (model.derived_nbytes() > 0) == FOLDED
    model.backend = "triton"  # re-resolved and re-prepared: the kernels take the parameters, rows aligned
    assert model.vision_model.ops.name == "triton"
    assert model.derived_nbytes() == _triton_padding_nbytes(model) > 0
    assert model.vision_model.layers[0]._mlp_act == "quick_gelu"
    model.to(torch.float32)
    assert model.derived_nbytes() == _triton_padding_nbytes(model) > 0


def _triton_padding_nbytes(model) -> int:
    # The last layers' query and key/value parts of QKV are prepared apart too (the pooled-only path).
    hidden = [t.config.hidden_size for t in (model.text_model, model.vision_model)]
    last_q_kv = [torch.empty(parts * h, h, dtype=model.dtype) for h in hidden for parts in (1, 2)]
    return sum(_padded_nbytes(w) for w in _gemm_weights(model) + last_q_kv)


def test_triton_padding_keeps_the_weights_and_zeros_the_rest(canonical):
    """The patch embedding's 3 x 7 x 7 = 147 in-features are padded to 192: the checkpoint's values, then
    zeros; the parameter itself keeps its shape."""
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical, backend="triton")
    weight = model.vision_model.patch_embedding.flatten(1)
    padded = model.vision_model._weight("patch_embedding")
    assert weight.shape[1] == 147 and padded.shape == (weight.shape[0], 192)
    assert torch.equal(padded[:, :147], weight) and not padded[:, 147:].any()
    assert model.vision_model.patch_embedding.shape[1:] == (3, 7, 7)


def test_backend_is_resolved_when_set_or_moved_not_per_forward(canonical, monkeypatch):
    monkeypatch.delenv("ALTCLIP_FAST_BACKEND", raising=False)
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical)
    assert model.text_model.ops.name == "torch"
    monkeypatch.setenv("ALTCLIP_FAST_BACKEND", "triton")
    assert model.text_model.ops.name == "torch"  # the environment is read at resolution only
    model.float()  # a conversion re-resolves
    assert model.text_model.ops.name == model.vision_model.ops.name == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "cuda"


@pytest.mark.skipif(not FOLDED, reason="oneDNN fused linear unavailable for bf16: no fold on this CPU")
def test_load_state_dict_re_prepares(canonical, batch):
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical, dtype="bf16", backend="torch")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model.get_image_features(batch["pixel_values"])
    state["vision_model.layers.0.fc2.weight"].mul_(2)
    model.load_state_dict(state)
    params = dict(model.named_parameters())
    assert_folds(model, lambda name: params[name])
    assert not torch.equal(model.get_image_features(batch["pixel_values"]), before)
