"""The whole fast model driven through the Triton kernels (``backend="triton"``): under Triton's
interpreter on CPU here, compiled on a GPU when there is one. Tiny config, because the interpreter is
slow (~2 s a forward).

fp32: relative error <= 1e-5 against the reference. fp16: the three-way rule, error against the fp32
reference <= 2x the reference's own fp16 error (plain torch in the same dtype) plus a small floor.
"""

from __future__ import annotations

import collections

import pytest
import torch

import altclip_fast.reference as reference
import altclip_fast.ops as dispatch
from altclip_fast.ops.triton_backend import load_kernels
from altclip_fast.modeling import model as fast
from tests.checkpoints import make_pixels, make_text_batch, random_hf_model, save_hf, tiny_config
from tests.parity import logits_err, rel_err

pytest.importorskip("triton")
pytest.importorskip("transformers")

CONFIG = tiny_config()
TOL = 1e-5
# Compiled kernels take CUDA tensors; without CUDA the conftest runs them under the interpreter on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(batch):
    return {k: v.to(DEVICE) for k, v in batch.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf(random_hf_model(CONFIG, seed=17), tmp_path_factory.mktemp("triton"))


@pytest.fixture(scope="module")
def batch():
    ids, mask = make_text_batch(CONFIG, [5, 9, 2, 7], seed=1)  # mixed lengths: the packed varlen path
    return dict(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(CONFIG, 2, seed=2))


@pytest.fixture(scope="module")
def fp32_answer(checkpoint, batch):
    with torch.no_grad():
        return reference.AltCLIPModel.from_pretrained(checkpoint)(**batch)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into the kernels package, to prove the kernels are what runs."""
    kernels = load_kernels()
    calls = collections.Counter()
    for name in ("attention", "add_layer_norm", "linear"):
        original = getattr(kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return calls


def test_fp32_through_the_kernels(checkpoint, batch, fp32_answer, kernel_calls):
    model = fast.AltCLIPModel.from_pretrained(checkpoint, backend="triton", device=DEVICE)
    out = model(**on_device(batch))
    layers = CONFIG.text_config.num_hidden_layers + CONFIG.vision_config.num_hidden_layers
    assert kernel_calls["attention"] == layers
    assert kernel_calls["linear"] >= 4 * layers and kernel_calls["add_layer_norm"] >= 2 * layers
    assert logits_err(out.logits_per_image, fp32_answer.logits_per_image, model.logit_scale) < TOL
    for name in ("text_embeds", "image_embeds"):
        assert rel_err(out[name], fp32_answer[name]) < TOL, name
    real = batch["attention_mask"].bool()
    assert rel_err(out.text_model_output.last_hidden_state.cpu()[real],
                   fp32_answer.text_model_output.last_hidden_state[real]) < TOL


def test_fp16_three_way_rule(checkpoint, batch, fp32_answer):
    dtype = torch.float16
    ours = fast.AltCLIPModel.from_pretrained(checkpoint, dtype=dtype, backend="triton", device=DEVICE)
    plain = reference.AltCLIPModel.from_pretrained(checkpoint, dtype=dtype)
    mine = ours(**on_device(batch))
    with torch.no_grad():
        theirs = plain(**dict(batch, pixel_values=batch["pixel_values"].to(dtype)))
    for name in ("text_embeds", "image_embeds"):
        ours_err, torch_err = rel_err(mine[name], fp32_answer[name]), rel_err(theirs[name], fp32_answer[name])
        assert ours_err <= 2 * torch_err + 2e-4, f"{name}: ours {ours_err:.2e} vs torch {torch_err:.2e}"
    assert torch.equal(mine.logits_per_image.argmax(-1).cpu(), fp32_answer.logits_per_image.argmax(-1))


def test_switching_backend_re_prepares_the_mlp_weights(checkpoint, batch, fp32_answer, monkeypatch):
    """A model loaded for the torch backend still gives the right answer when switched to the Triton
    kernels, and back; the environment variable selects the backend too (read when it is set)."""
    model = fast.AltCLIPModel.from_pretrained(checkpoint, backend="torch", device=DEVICE)
    pixels = batch["pixel_values"].to(DEVICE)
    want = fp32_answer.image_embeds
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    model.backend = None
    assert model.vision_model.ops.name == "triton"
    got = model.get_image_features(pixels)
    assert model.vision_model.layers[0]._mlp_act == "quick_gelu"  # the fold is the torch backend's
    assert rel_err(got / got.norm(dim=-1, keepdim=True), want) < TOL
    model.backend = "torch"
    assert model.vision_model.ops.name == "torch"
    got = model.get_image_features(pixels)
    assert rel_err(got / got.norm(dim=-1, keepdim=True), want) < TOL


def test_pooled_getters_through_the_kernels(checkpoint, batch, fp32_answer, kernel_calls):
    """The embedding getters run the last layer for the pooled token alone (its query against every
    key): through the kernels, for packed text, left-padded text (the masked padded layout) and images,
    they give the full forward's embeddings."""
    model = fast.AltCLIPModel.from_pretrained(checkpoint, backend="triton", device=DEVICE)
    ref = reference.AltCLIPModel.from_pretrained(checkpoint)
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for row in (0, 2):  # left padding: the pooled position 0 is a pad that attends to the real tokens
        shift = int((1 - mask[row]).sum())
        ids[row], mask[row] = torch.roll(ids[row], shift), torch.roll(mask[row], shift)
    with torch.no_grad():
        left_padded_want = ref.get_text_features(ids, mask)
    on = on_device(batch)
    cases = [
        (model.get_text_features(on["input_ids"], on["attention_mask"]), fp32_answer.text_embeds),
        (model.get_text_features(ids.to(DEVICE), mask.to(DEVICE)), left_padded_want),
        (model.get_image_features(on["pixel_values"]), fp32_answer.image_embeds),
    ]
    layers = 2 * CONFIG.text_config.num_hidden_layers + CONFIG.vision_config.num_hidden_layers
    assert kernel_calls["attention"] == layers
    for got, want in cases:
        got = got.cpu()
        assert rel_err(got / got.norm(dim=-1, keepdim=True), want / want.norm(dim=-1, keepdim=True)) < TOL
