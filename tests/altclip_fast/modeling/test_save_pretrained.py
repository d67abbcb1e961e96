"""``save_pretrained`` writes what transformers and altclip_fast both load, and the key maps it uses
(``modeling.weights``) are exact inverses of the ones loading uses."""

from __future__ import annotations

import json

import pytest
import torch

from altclip_fast.modeling import model as fast
from altclip_fast.modeling import weights
from altclip_fast.modeling.checkpoint import canonicalize_keys
from tests.checkpoints import make_pixels, make_text_batch, random_hf_model, save_hf, tiny_config

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CONFIG = tiny_config()


@pytest.fixture(scope="module")
def hf():
    return random_hf_model(CONFIG, seed=11)


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory):
    return save_hf(hf, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def canonical(hf):
    return canonicalize_keys(hf.state_dict())


def _batch():
    ids, mask = make_text_batch(CONFIG, [4, 7, 2], seed=2)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(CONFIG, 2, seed=3))


def _assert_clean_load(info):
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert not info["mismatched_keys"] and not info["error_msgs"], info


# ------------------------------------------------------------------------------------ key maps


def _distinct(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A tensor per name whose values appear in no other tensor, so any mix-up shows."""
    out, start = {}, 0
    for name in sorted(shapes):
        n = torch.Size(shapes[name]).numel()
        out[name] = torch.arange(start, start + n, dtype=torch.float64).reshape(shapes[name])
        start += n
    return out


def _roundtrip_mismatches(load_map, save_map, config) -> list[str]:
    """Checkpoint keys (and fast names) that do not survive load-then-save (and save-then-load)."""
    ckpt = _distinct(weights.checkpoint_shapes_for(load_map, _fast_shapes(config)))
    fast_state = weights.fuse_state_dict(load_map, ckpt)
    back = weights.split_state_dict(save_map, fast_state)
    bad = [k for k in ckpt if k not in back or not torch.equal(back[k], ckpt[k])]
    bad += [k for k in back if k not in ckpt]
    again = weights.fuse_state_dict(load_map, back) if not bad else {}
    bad += [k for k in again if not torch.equal(again[k], fast_state[k])]
    return bad


def _fast_shapes(config):
    with torch.device("meta"):
        model = fast.AltCLIPModel(config)
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


def test_key_map_covers_every_checkpoint_key_once(canonical):
    key_map = weights.model_key_map(CONFIG)
    sources = [s for srcs in key_map.values() for s in srcs]
    assert len(sources) == len(set(sources))
    assert set(sources) == set(canonical)
    assert set(key_map) == set(_fast_shapes(CONFIG))


def test_split_is_the_exact_inverse_of_fuse():
    key_map = weights.model_key_map(CONFIG)
    assert _roundtrip_mismatches(key_map, key_map, CONFIG) == []


def _swap_sources(key_map, a, b):
    wrong = dict(key_map)
    wrong[a], wrong[b] = key_map[b], key_map[a]
    return wrong


@pytest.mark.parametrize(
    "corrupt",
    [
        # two same-shaped entries exchanged
        lambda m: _swap_sources(m, "text_model.layers.0.norm1.weight", "text_model.layers.0.norm2.weight"),
        # a fused entry's parts in another order (key before query)
        lambda m: {**m, "vision_model.layers.1.qkv.bias": tuple(m["vision_model.layers.1.qkv.bias"][i] for i in (1, 0, 2))},
        # one checkpoint key renamed
        lambda m: {**m, "logit_scale": ("logit_scale_typo",)},
    ],
    ids=["swapped-entries", "qkv-order", "renamed-key"],
)
def test_the_inverse_check_catches_one_wrong_entry(corrupt):
    key_map = weights.model_key_map(CONFIG)
    assert _roundtrip_mismatches(key_map, corrupt(key_map), CONFIG) != []


def test_split_parts_do_not_share_storage():
    key_map = weights.vision_key_map(CONFIG.vision_config)
    with torch.device("meta"):
        tower = fast.AltCLIPVisionModel(CONFIG.vision_config)
    state = {k: torch.randn(p.shape) for k, p in tower.named_parameters()}
    parts = weights.split_state_dict(key_map, state)
    q, k = parts["encoder.layers.0.self_attn.q_proj.weight"], parts["encoder.layers.0.self_attn.k_proj.weight"]
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([q, k, parts["encoder.layers.0.self_attn.v_proj.weight"]]), state["layers.0.qkv.weight"])


def test_split_refuses_a_fused_tensor_that_does_not_divide():
    key_map = {"qkv.weight": ("q", "k", "v")}
    with pytest.raises(ValueError, match="qkv.weight"):
        weights.split_state_dict(key_map, {"qkv.weight": torch.zeros(7, 2)})


# ------------------------------------------------------------------------------- save_pretrained


@torch.no_grad()
def test_transformers_loads_the_saved_model(hf, hf_dir, tmp_path):
    model = fast.AltCLIPModel.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "altclip" and config["architectures"] == ["AltCLIPModel"]
    assert config["text_config"]["model_type"] == "altclip_text_model"
    assert config["vision_config"]["model_type"] == "altclip_vision_model"

    loaded, info = transformers.AltCLIPModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    _assert_clean_load(info)
    loaded.eval()
    assert loaded.dtype == torch.float32
    for key, value in canonicalize_keys(loaded.state_dict()).items():
        assert torch.equal(value, canonicalize_keys(hf.state_dict())[key]), key
    batch = _batch()
    want, got = hf(**batch), loaded(**batch)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-6)


@torch.no_grad()
def test_round_trip_through_altclip_fast(hf_dir, tmp_path):
    model = fast.AltCLIPModel.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path)
    again = fast.AltCLIPModel.from_pretrained(tmp_path)
    before, after = dict(model.named_parameters()), dict(again.named_parameters())
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    batch = _batch()
    assert torch.equal(model(**batch).logits_per_image, again(**batch).logits_per_image)


def test_saved_file_layout(hf_dir, canonical, tmp_path):
    fast.AltCLIPModel.from_pretrained(hf_dir).save_pretrained(tmp_path / "a" / "b")  # parents created
    path = tmp_path / "a" / "b" / "model.safetensors"
    with safetensors_torch.safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(canonical)
    saved = safetensors_torch.load_file(str(path))
    for key, value in canonical.items():
        assert torch.equal(saved[key], value), key


@torch.no_grad()
def test_bf16_model_saves_bf16(hf_dir, canonical, tmp_path):
    model = fast.AltCLIPModel.from_pretrained(hf_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    saved = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    for key, value in canonical.items():
        # The checkpoint's values rounded to bf16 (one more rounding at most, where a backend stores
        # the vision MLP in another form and saving converts it back).
        torch.testing.assert_close(saved[key], value.to(torch.bfloat16), rtol=2**-7, atol=0, msg=key)
    again = fast.AltCLIPModel.from_pretrained(tmp_path)
    assert again.dtype == torch.float32  # from_pretrained's default, as transformers 4
    assert fast.AltCLIPModel.from_pretrained(tmp_path, dtype="bf16").dtype == torch.bfloat16


def test_refuses_a_file_as_directory(hf_dir, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    model = fast.AltCLIPModel.from_pretrained(hf_dir)
    with pytest.raises(ValueError, match=str(target)):
        model.save_pretrained(target)
    assert target.read_text() == "not a directory"


@torch.no_grad()
def test_towers_save_standalone_checkpoints(hf_dir, tmp_path):
    batch = _batch()
    text = fast.AltCLIPTextModel.from_pretrained(hf_dir)
    text.save_pretrained(tmp_path / "text")
    hf_text, info = transformers.AltCLIPTextModel.from_pretrained(tmp_path / "text", output_loading_info=True)
    _assert_clean_load(info)
    ours = text(batch["input_ids"], batch["attention_mask"]).pooler_output
    theirs = hf_text.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    again = fast.AltCLIPTextModel.from_pretrained(tmp_path / "text")
    assert all(torch.equal(a, b) for a, b in zip(text.parameters(), again.parameters()))

    vision = fast.AltCLIPVisionModel.from_pretrained(hf_dir)
    vision.save_pretrained(tmp_path / "vision")
    hf_vision, info = transformers.AltCLIPVisionModel.from_pretrained(tmp_path / "vision", output_loading_info=True)
    _assert_clean_load(info)
    ours = vision(batch["pixel_values"]).pooler_output
    theirs = hf_vision.eval()(pixel_values=batch["pixel_values"]).pooler_output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    again = fast.AltCLIPVisionModel.from_pretrained(tmp_path / "vision")
    assert all(torch.equal(a, b) for a, b in zip(vision.parameters(), again.parameters()))
