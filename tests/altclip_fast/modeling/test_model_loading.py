"""Loading the fast model: every checkpoint key is consumed by the re-layout (fused QKV, folded
quick_gelu, derived beside the parameters), every parameter is filled, and a checkpoint that does not fit is a CheckpointError that
names the keys and shapes."""

from __future__ import annotations

import pytest
import torch

from altclip_fast import CheckpointError

from altclip_fast.kernels.activations import QUICK_GELU_ALPHA
from altclip_fast.ops.torch_backend import TorchOps
from altclip_fast.modeling import model as fast
from altclip_fast.modeling.checkpoint import canonicalize_keys
from altclip_fast.modeling.weights import model_key_map
from tests.checkpoints import (
    make_pixels,
    make_text_batch,
    random_hf_model,
    save_hf,
    save_raw,
    tiny_config,
    to_transformers4_layout,
)

pytest.importorskip("transformers")

CONFIG = tiny_config()


@pytest.fixture(scope="module")
def hf():
    return random_hf_model(CONFIG, seed=5)


@pytest.fixture(scope="module")
def canonical(hf):
    return canonicalize_keys(hf.state_dict())


def test_checkpoint_shapes_are_transformers_keys(canonical):
    assert fast.checkpoint_shapes(CONFIG) == {k: tuple(v.shape) for k, v in canonical.items()}


def test_every_parameter_comes_from_the_checkpoint(canonical):
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical, backend="torch")
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    t, v = "text_model.roberta.encoder.layer.1.attention.", "vision_model.encoder.layers.1.self_attn."
    torch.testing.assert_close(
        params["text_model.layers.1.qkv.weight"],
        torch.cat([canonical[t + f"self.{n}.weight"] for n in ("query", "key", "value")]), rtol=0, atol=0,
    )
    torch.testing.assert_close(
        params["vision_model.layers.1.qkv.bias"],
        torch.cat([canonical[v + f"{n}_proj.bias"] for n in "qkv"]), rtol=0, atol=0,
    )
    torch.testing.assert_close(
        params["vision_model.patch_embedding"], canonical["vision_model.embeddings.patch_embedding.weight"]
    )
    # Every parameter equals (a concatenation of) its checkpoint tensors.
    for name, sources in model_key_map(CONFIG).items():
        want = torch.cat([canonical[s] for s in sources]) if len(sources) > 1 else canonical[sources[0]]
        torch.testing.assert_close(params[name], want, rtol=0, atol=0, msg=name)


def test_quick_gelu_fold_happens_in_fp32_before_rounding(canonical, monkeypatch):
    monkeypatch.setenv("ALTCLIP_FAST_CPU_HALF_GEMM", "native")  # the fold is the oneDNN path's
    if not TorchOps()._onednn(torch.device("cpu"), torch.bfloat16):
        pytest.skip("oneDNN fused linear unavailable: no fold on this CPU")
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical, dtype="bf16", backend="torch")
    got = model.vision_model.layers[0].prepared["fc1.weight"]
    got = got.to_dense() if got.is_mkldnn else got
    want = (canonical["vision_model.encoder.layers.0.mlp.fc1.weight"].float() * QUICK_GELU_ALPHA)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))  # rounded once, from fp32


def _load_error(state, match):
    with pytest.raises(CheckpointError) as info:
        fast.AltCLIPModel.from_state_dict(CONFIG, state)
    message = str(info.value)
    for part in match:
        assert part in message, message
    return message


def test_missing_key_is_named_with_its_shape(canonical):
    state = dict(canonical)
    del state["text_model.roberta.encoder.layer.0.attention.self.key.weight"]
    _load_error(state, ["missing keys (1)", "text_model.roberta.encoder.layer.0.attention.self.key.weight (40, 40)"])


def test_unexpected_key_is_named_with_its_shape(canonical):
    state = dict(canonical)
    state["text_model.roberta.pooler.dense.weight"] = torch.zeros(40, 40)
    _load_error(state, ["unexpected keys (1)", "text_model.roberta.pooler.dense.weight (40, 40)"])


def test_shape_mismatch_is_named_with_both_shapes(canonical):
    state = dict(canonical)
    state["vision_model.encoder.layers.1.self_attn.v_proj.bias"] = torch.zeros(47)
    _load_error(state, ["shape mismatches (1)", "v_proj.bias: checkpoint (47,) vs model (48,)"])


def test_checkpoint_for_another_config_lists_everything(canonical):
    message = _load_error({k: v for k, v in canonical.items() if "layer.1." not in k and "layers.1." not in k},
                          ["missing keys (32)"])
    assert "text_model.roberta.encoder.layer.1.output.LayerNorm.bias (40,)" in message


@torch.no_grad()
def test_transformers4_hub_layout_with_stale_buffers(hf, tmp_path):
    ids, mask = make_text_batch(CONFIG, [3, 6], seed=1)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(CONFIG, 2))
    from_t5 = fast.AltCLIPModel.from_pretrained(save_hf(hf, tmp_path / "t5"))(**batch)
    raw = to_transformers4_layout(hf.state_dict(), CONFIG)
    for fmt, shards in (("bin", 1), ("safetensors", 3)):
        directory = save_raw(raw, CONFIG, tmp_path / f"{fmt}{shards}", fmt=fmt, shards=shards)
        out = fast.AltCLIPModel.from_pretrained(directory)(**batch)
        assert torch.equal(out.logits_per_image, from_t5.logits_per_image)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_converted_once_to_the_requested_dtype(hf, tmp_path_factory, dtype):
    directory = save_hf(hf, tmp_path_factory.mktemp("d"))
    model = fast.AltCLIPModel.from_pretrained(directory, dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.dtype == dtype and model.device == torch.device("cpu")
    text = fast.AltCLIPTextModel.from_pretrained(directory, dtype=str(dtype).removeprefix("torch."))
    assert {p.dtype for p in text.parameters()} == {dtype}
    vision = fast.AltCLIPVisionModel.from_pretrained(directory, torch_dtype=dtype)  # transformers 4's spelling
    assert {p.dtype for p in vision.parameters()} == {dtype}
    with pytest.raises(ValueError, match="disagree"):
        fast.AltCLIPModel.from_pretrained(directory, dtype=torch.float32, torch_dtype=dtype)


@pytest.mark.parametrize("shards", [1, 2])
def test_safetensors_streamed_into_bf16_equal_the_checkpoint_rounded_once(canonical, tmp_path, shards, monkeypatch):
    from altclip_fast.modeling import lazy_tensors

    monkeypatch.setattr(lazy_tensors, "CHUNK_BYTES", 100)  # every tensor arrives in many slices
    monkeypatch.setenv("ALTCLIP_FAST_CPU_HALF_GEMM", "native")  # the fold is the oneDNN path's
    fp32 = {k: v.float() for k, v in canonical.items()}
    directory = save_raw(fp32, CONFIG, tmp_path / "ckpt", fmt="safetensors", shards=shards)
    model = fast.AltCLIPModel.from_pretrained(directory, dtype=torch.bfloat16, backend="torch")
    params = dict(model.named_parameters())
    for name, sources in model_key_map(CONFIG).items():
        want = torch.cat([fp32[s] for s in sources]) if len(sources) > 1 else fp32[sources[0]]
        assert torch.equal(params[name], want.to(torch.bfloat16)), name
    if TorchOps()._onednn(torch.device("cpu"), torch.bfloat16):
        got = model.vision_model.layers[1].prepared["fc1.weight"]
        got = got.to_dense() if got.is_mkldnn else got
        want = fp32["vision_model.encoder.layers.1.mlp.fc1.weight"] * QUICK_GELU_ALPHA
        assert torch.equal(got, want.to(torch.bfloat16))  # from the file's fp32, rounded once
