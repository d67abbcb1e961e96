"""``interpolate_pos_encoding``: the fast model at image sizes other than the checkpoint's, against
transformers 5 on the same random checkpoint.

fp32 within 1e-5 at 336x336 and 224x320 (a 224 px, patch 14 model, as BAAI/AltCLIP) and at 230x300,
which is not a multiple of the patch (the conv drops the ragged border, the grid is 16x21). bf16/fp16:
the error against the fp32 oracle stays within 2x transformers-math's own error in that dtype (the
reference run in the dtype), plus a small floor. The Triton backend runs the same sizes under the
interpreter. The resized table is cached per (height, width, dtype, device) and dropped whenever
the tower is prepared again.
"""

from __future__ import annotations

import collections

import pytest
import torch

import altclip_fast.reference as reference
from altclip_fast.modeling import model as fast
from tests.checkpoints import make_text_batch, random_hf_model, save_hf, tiny_config
from tests.parity import logits_err, rel_err

transformers = pytest.importorskip("transformers")

# BAAI/AltCLIP's geometry (224 px, patch 14: a 16x16 grid) with tiny widths.
CONFIG = tiny_config(image_size=224, patch_size=14, vision_hidden=48, vision_heads=3, layers=2)
SIZES = {"336x336": (336, 336), "224x320": (224, 320), "230x300-ragged": (230, 300)}
TOL = 1e-5


def pixels(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, height, width), generator=gen)


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(CONFIG, seed=21)


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    return save_hf(hf_model, tmp_path_factory.mktemp("interp"))


@pytest.fixture(scope="module")
def ours(checkpoint):
    return fast.AltCLIPModel.from_pretrained(checkpoint, backend="torch")


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_fp32_matches_transformers(hf_model, ours, size):
    pv = pixels(*size)
    ids, mask = make_text_batch(CONFIG, [4, 7, 2], seed=5)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, pixel_values=pv, interpolate_pos_encoding=True,
                          output_hidden_states=True)
        their_features = _features(hf_model.get_image_features(pixel_values=pv, interpolate_pos_encoding=True))
    mine = ours(input_ids=ids, attention_mask=mask, pixel_values=pv, interpolate_pos_encoding=True,
                output_hidden_states=True)
    rows, cols = size[0] // 14, size[1] // 14
    assert mine.vision_model_output.last_hidden_state.shape == (2, 1 + rows * cols, 48)
    assert rel_err(mine.image_embeds, theirs.image_embeds) < TOL
    assert logits_err(mine.logits_per_image, theirs.logits_per_image, ours.logit_scale) < TOL
    for a, b in zip(mine.vision_model_output.hidden_states, theirs.vision_model_output.hidden_states):
        assert rel_err(a, b) < TOL
    assert rel_err(ours.get_image_features(pv, interpolate_pos_encoding=True), their_features) < TOL


def test_vision_model_alone(checkpoint, hf_model):
    tower = fast.AltCLIPVisionModel.from_pretrained(checkpoint, backend="torch")
    pv = pixels(224, 320, seed=3)
    with torch.no_grad():
        theirs = hf_model.vision_model(pixel_values=pv, interpolate_pos_encoding=True)
    mine = tower(pv, interpolate_pos_encoding=True)
    assert rel_err(mine.last_hidden_state, theirs.last_hidden_state) < TOL
    assert rel_err(mine.pooler_output, theirs.pooler_output) < TOL


def test_native_size_is_unchanged_by_the_flag(ours):
    pv = pixels(224, 224, seed=4)
    # transformers' rule: a square image with the native patch count keeps the table, untouched.
    assert torch.equal(ours.get_image_features(pv, interpolate_pos_encoding=True), ours.get_image_features(pv))
    assert torch.equal(ours.get_image_features(pixels(230, 230, seed=4), interpolate_pos_encoding=True),
                       ours.get_image_features(pixels(230, 230, seed=4)[..., :224, :224], interpolate_pos_encoding=True))
    assert not any(key[:2] in ((224, 224), (230, 230)) for key in ours.vision_model._position_cache)


def test_other_sizes_without_the_flag_are_an_error_naming_both(ours, checkpoint):
    ids, mask = make_text_batch(CONFIG, [3], seed=0)
    for call in (
        lambda pv: ours.get_image_features(pv),
        lambda pv: ours(input_ids=ids, attention_mask=mask, pixel_values=pv),
        lambda pv: reference.AltCLIPModel.from_pretrained(checkpoint).get_image_features(pv),
    ):
        with pytest.raises(ValueError, match=r"\(336\*336\) doesn't match model \(224\*224\)"):
            call(pixels(336, 336, batch=1))
    for model in (ours, reference.AltCLIPModel.from_pretrained(checkpoint)):
        with pytest.raises(ValueError, match="no whole 14x14 patch"):
            model.get_image_features(pixels(10, 300, batch=1), interpolate_pos_encoding=True)


def test_the_resized_table_is_cached_and_dropped_on_prepare(checkpoint):
    model = fast.AltCLIPModel.from_pretrained(checkpoint, backend="torch")
    tower = model.vision_model
    pv = pixels(336, 336, batch=1)
    first = model.get_image_features(pv, interpolate_pos_encoding=True)
    assert list(tower._position_cache) == [(336, 336, torch.float32, torch.device("cpu"))]
    table = tower._position_cache[(336, 336, torch.float32, torch.device("cpu"))]
    model.get_image_features(pv, interpolate_pos_encoding=True)
    assert tower._position_cache[(336, 336, torch.float32, torch.device("cpu"))] is table  # computed once
    model.get_image_features(pixels(224, 320, batch=1), interpolate_pos_encoding=True)
    assert len(tower._position_cache) == 2
    assert not any("cache" in k for k in model.state_dict())

    # New weights through load_state_dict: the table must come from them, not from the cache.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["vision_model.position_embedding"] = state["vision_model.position_embedding"] * 0.5
    model.load_state_dict(state)
    assert not tower._position_cache
    fresh = fast.AltCLIPModel.from_pretrained(checkpoint, backend="torch")
    fresh.load_state_dict(state)
    assert torch.equal(model.get_image_features(pv, interpolate_pos_encoding=True),
                       fresh.get_image_features(pv, interpolate_pos_encoding=True))
    assert not torch.equal(model.get_image_features(pv, interpolate_pos_encoding=True), first)

    # A dtype change re-prepares: the cache empties and refills in the new dtype.
    model.to(torch.bfloat16)
    assert not tower._position_cache
    model.get_image_features(pv, interpolate_pos_encoding=True)
    assert list(tower._position_cache) == [(336, 336, torch.bfloat16, torch.device("cpu"))]
    assert tower._position_cache[(336, 336, torch.bfloat16, torch.device("cpu"))].dtype == torch.bfloat16
    # In-place edits are followed by prepare() (the documented contract), which empties it too.
    model.prepare()
    assert not tower._position_cache


FLOOR = {torch.float16: 2e-4, torch.bfloat16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_rule(checkpoint, dtype):
    # 32 logits, not 6: the largest error among 6 is noise (plain torch's own swung from 1.4e-3 to
    # 9.3e-3 across 8 random checkpoints in bf16), too little to hold a 2x rule against.
    pv = pixels(336, 336, batch=4, seed=6)
    ids, mask = make_text_batch(CONFIG, [5, 3, 8, 6, 2, 7, 4, 9], seed=6)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, interpolate_pos_encoding=True)
    with torch.no_grad():
        want = reference.AltCLIPModel.from_pretrained(checkpoint)(**batch)
        plain = reference.AltCLIPModel.from_pretrained(checkpoint, dtype=dtype)
        theirs = plain(**{**batch, "pixel_values": pv.to(dtype)})
    mine = fast.AltCLIPModel.from_pretrained(checkpoint, dtype=dtype)(**batch)
    assert mine.image_embeds.dtype == dtype
    for name in ("image_embeds", "text_embeds"):
        ours_err, torch_err = rel_err(mine[name], want[name]), rel_err(theirs[name], want[name])
        assert ours_err <= 2 * torch_err + FLOOR[dtype], f"{name}: ours {ours_err:.2e} vs torch {torch_err:.2e}"
    scale = want.logits_per_image.new_tensor(float(plain.logit_scale))
    assert logits_err(mine.logits_per_image, want.logits_per_image, scale) <= (
        2 * logits_err(theirs.logits_per_image, want.logits_per_image, scale) + FLOOR[dtype]
    )


# ---------------------------------------------------------------------------------------------- Triton

# The interpreter is slow: a smaller grid (28 px, patch 7: 4x4 native) at the same kinds of size.
SMALL = tiny_config(image_size=28, patch_size=7)
SMALL_SIZES = {"42x42": (42, 42), "28x49": (28, 49), "45x33-ragged": (45, 33)}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    hf = random_hf_model(SMALL, seed=23)
    return hf, save_hf(hf, tmp_path_factory.mktemp("interp_small"))


@pytest.mark.parametrize("size", SMALL_SIZES.values(), ids=SMALL_SIZES.keys())
def test_triton_backend_fp32(small, size, monkeypatch):
    pytest.importorskip("triton")
    from altclip_fast.ops.triton_backend import load_kernels

    kernels = load_kernels()
    calls = collections.Counter()
    for name in ("attention", "linear"):
        original = getattr(kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    hf, path = small
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = fast.AltCLIPModel.from_pretrained(path, backend="triton", device=device)
    pv = pixels(*size, seed=8)
    with torch.no_grad():
        theirs = hf.vision_model(pixel_values=pv, interpolate_pos_encoding=True)
        their_features = _features(hf.get_image_features(pixel_values=pv, interpolate_pos_encoding=True))
    mine = model.vision_model(pv.to(device), interpolate_pos_encoding=True)
    assert calls["attention"] == SMALL.vision_config.num_hidden_layers
    assert rel_err(mine.last_hidden_state, theirs.last_hidden_state) < TOL
    assert rel_err(mine.pooler_output, theirs.pooler_output) < TOL
    assert rel_err(model.get_image_features(pv.to(device), interpolate_pos_encoding=True), their_features) < TOL
