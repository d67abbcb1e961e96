"""BAAI's AltCLIP-m9 and AltCLIP-m18, as checkpoints of their shape with random weights.

What their published files have that BAAI/AltCLIP's do not, each written here:

- m18: ``projection_dim`` 1024 (not 768); only a pickled ``pytorch_model.bin``; a ``config.json`` with
  leftover keys of FlagAI's training config (``num_layers``, ``direct_kd``, ``variant``); and, in the
  weights, FlagAI's ``text_model.transformation_pre`` head, which CLIP inference never reads.
- m9: BAAI/AltCLIP's sizes; only ``pytorch_model.bin`` (transformers 4 layout, stale position ids); a
  config as transformers 4 wrote it, with ``text_config_dict`` / ``vision_config_dict``.

Each must load (fast model and reference), match transformers 5 loading the same directory, and
run through ``classify``, ``embed`` and the benchmark's ``--model``. A FlagAI-format config.json
(model_type ``clip``, which transformers reads as AltCLIP with a warning) reads the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import altclip_fast.reference as reference
from altclip_fast.errors import ConfigError
from altclip_fast.modeling import model as fast
from altclip_fast.modeling.config import AltCLIPConfig
from altclip_fast.preprocessing.processor import AltCLIPProcessor
from tests.altclip_fast.processor_fixtures import (
    photo_like, tokenizer_vocab_size, write_preprocessor_config, write_tokenizer_files,
)
from tests.checkpoints import hf_config, make_pixels, make_text_batch, random_hf_model, tiny_config, to_transformers4_layout
from tests.parity import logits_err, rel_err

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SHAPES = {
    # Every dimension from the config: projection 1024 next to a text project_dim of 20.
    "m18": tiny_config(vocab_size=tokenizer_vocab_size(), project_dim=20, projection_dim=1024),
    "m9": tiny_config(vocab_size=tokenizer_vocab_size()),
}


def _config_json(name: str) -> dict:
    config = SHAPES[name]
    data = json.loads(hf_config(config).to_json_string())
    data["architectures"] = ["AltCLIPModel"]
    if name == "m18":
        data.update(num_layers=3, direct_kd=False, variant="invert", text_model_name=None, vision_model_name=None)
    else:  # transformers 4.2x wrote each section twice; the `_dict` copy is the one that counts
        data["text_config_dict"] = dict(data["text_config"])
        data["vision_config_dict"] = dict(data["vision_config"])
        data["transformers_version"] = "4.26.0.dev0"
    return data


def write_checkpoint(name: str, directory: Path, seed: int) -> Path:
    config = SHAPES[name]
    hf = random_hf_model(config, seed=seed)
    state = to_transformers4_layout(hf.state_dict(), config)
    if name == "m18":
        gen = torch.Generator().manual_seed(seed)
        tc = config.text_config
        state["text_model.transformation_pre.weight"] = torch.randn(tc.project_dim, tc.hidden_size, generator=gen)
        state["text_model.transformation_pre.bias"] = torch.randn(tc.project_dim, generator=gen)
    directory.mkdir(parents=True)
    torch.save(state, directory / "pytorch_model.bin")  # pickled, the only weights file
    (directory / "config.json").write_text(json.dumps(_config_json(name), indent=2))
    write_tokenizer_files(directory)
    write_preprocessor_config(directory, shortest_edge=30, crop=30)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("m9_m18")
    return {name: write_checkpoint(name, root / name, seed=40 + i) for i, name in enumerate(SHAPES)}


@pytest.mark.parametrize("name", SHAPES)
def test_config_reads_as_transformers_reads_it(checkpoints, name):
    ours = AltCLIPConfig.from_pretrained(checkpoints[name])
    theirs = transformers.AltCLIPConfig.from_pretrained(checkpoints[name])
    assert ours.projection_dim == theirs.projection_dim == SHAPES[name].projection_dim
    for mine, ref in ((ours.text_config, theirs.text_config), (ours.vision_config, theirs.vision_config)):
        for field, value in mine.to_dict().items():
            if field != "model_type" and hasattr(ref, field):
                assert value == getattr(ref, field), field
    assert ours == SHAPES[name]


def test_legacy_dict_sections_replace_the_section_as_in_transformers(tmp_path):
    data = _config_json("m9")
    data["text_config"]["hidden_size"] = 64  # overridden: the `_dict` copy (with defaults) wins
    data["vision_config_dict"] = {"hidden_size": 96, "num_attention_heads": 6}
    (tmp_path / "config.json").write_text(json.dumps(data))
    ours = AltCLIPConfig.from_pretrained(tmp_path)
    theirs = transformers.AltCLIPConfig.from_pretrained(tmp_path)
    for mine, ref in ((ours.text_config, theirs.text_config), (ours.vision_config, theirs.vision_config)):
        for field, value in mine.to_dict().items():
            if field != "model_type" and hasattr(ref, field):
                assert value == getattr(ref, field), field


@pytest.mark.parametrize("name", SHAPES)
def test_loads_and_matches_transformers(checkpoints, name):
    path, config = checkpoints[name], SHAPES[name]
    ids, mask = make_text_batch(config, [5, 9, 2], seed=1)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(config, 2, seed=2))
    theirs_model = transformers.AltCLIPModel.from_pretrained(path).eval()
    with torch.no_grad():
        theirs = theirs_model(**batch)
        want_image = theirs_model.get_image_features(pixel_values=batch["pixel_values"])
        want_image = want_image if isinstance(want_image, torch.Tensor) else want_image.pooler_output
    for model in (fast.AltCLIPModel.from_pretrained(path), reference.AltCLIPModel.from_pretrained(path)):
        with torch.no_grad():
            out = model(**batch)
        assert out.image_embeds.shape == (2, config.projection_dim)
        for field in ("text_embeds", "image_embeds"):
            assert rel_err(out[field], theirs[field]) < TOL, field
        assert logits_err(out.logits_per_image, theirs.logits_per_image, theirs_model.logit_scale) < TOL
        with torch.no_grad():
            assert rel_err(model.get_image_features(batch["pixel_values"]), want_image) < TOL


def test_flagai_format_config_reads_as_in_transformers(checkpoints, tmp_path):
    """FlagAI's own config.json (model_type clip, an xlm-roberta text section): transformers reads it as
    AltCLIP, with a warning; so do we, the fast model, the reference and each tower alone."""
    data = _config_json("m9")
    data["model_type"] = "clip"
    data["text_config"]["model_type"] = "xlm-roberta"
    data["vision_config"]["model_type"] = "clip_vision_model"
    for key in ("text_config_dict", "vision_config_dict"):
        data.pop(key)
    data.update(num_layers=3, variant="invert")
    (tmp_path / "config.json").write_text(json.dumps(data))
    (tmp_path / "pytorch_model.bin").symlink_to(checkpoints["m9"] / "pytorch_model.bin")
    config = SHAPES["m9"]
    ids, mask = make_text_batch(config, [4, 6], seed=3)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(config, 2, seed=3))
    theirs_model = transformers.AltCLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = theirs_model(**batch)
    for model in (fast.AltCLIPModel.from_pretrained(tmp_path), reference.AltCLIPModel.from_pretrained(tmp_path)):
        with torch.no_grad():
            out = model(**batch)
        for field in ("text_embeds", "image_embeds"):
            assert rel_err(out[field], theirs[field]) < TOL, field
    with torch.no_grad():
        assert rel_err(fast.AltCLIPVisionModel.from_pretrained(tmp_path)(batch["pixel_values"]).pooler_output,
                       theirs.vision_model_output.pooler_output) < TOL
    assert fast.AltCLIPTextModel.from_pretrained(tmp_path).config == config.text_config
    # A real CLIP checkpoint (a CLIP text tower) is still not an AltCLIP.
    data["text_config"]["model_type"] = "clip_text_model"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="model_type must be 'altclip', got 'clip'"):
        fast.AltCLIPModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- apps


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("m18_photos")
    for i, (w, h) in enumerate([(40, 30), (33, 50), (64, 48)]):
        photo_like(w, h, seed=i).save(root / f"img{i}.png")
    return root


def test_m18_classify_and_embed(checkpoints, photos, tmp_path):
    from tests.altclip_fast.apps.cli_helpers import CPU_FP32, run_cli

    path = checkpoints["m18"]
    hf = transformers.AltCLIPModel.from_pretrained(path).eval()
    processor = AltCLIPProcessor.from_pretrained(path)
    images = sorted(str(p) for p in photos.glob("*.png"))
    labels = ["cat", "一只狗", "car"]

    proc = run_cli("classify", *images, "--labels", *labels, "--top-k", 3, "--json", "--model", path, *CPU_FP32,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        probs = hf(**processor(text=labels, images=images)).logits_per_image.softmax(-1).numpy()
    for result, want in zip(json.loads(proc.stdout), probs):
        order = np.argsort(-want)
        assert [p["label"] for p in result["predictions"]] == [labels[i] for i in order]
        np.testing.assert_allclose([p["probability"] for p in result["predictions"]], want[order], atol=2e-5)

    out = tmp_path / "photos.npy"
    proc = run_cli("embed", photos, "--out", out, "--model", path, "--workers", 0, *CPU_FP32, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [r["path"] if "path" in r else r for r in json.loads(Path(str(out) + ".meta.json").read_text())["rows"]]
    got = np.load(out)
    assert got.shape == (3, 1024)
    with torch.no_grad():
        want = hf.get_image_features(pixel_values=processor(images=[str(photos / Path(r).name) for r in rows]).pixel_values)
    want = (want if isinstance(want, torch.Tensor) else want.pooler_output).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", SHAPES)
def test_benchmark_model_option(checkpoints, name, tmp_path):
    from altclip_fast.apps import benchmark

    out = tmp_path / "bench.json"
    args = ["--model", str(checkpoints[name]), "--rounds", "1", "--batches", "1", "--texts", "3", "--max-tokens", "12",
            "--dtype", "fp32", "--json", str(out)]
    assert benchmark.main(args) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["oracle"] == "transformers"
    for model in ("altclip_fast", "transformers"):
        assert report["accuracy"][model]["image_embeds_max_abs"] < 1e-5
        assert report["accuracy"][model]["text_embeds_max_abs"] < 1e-5
