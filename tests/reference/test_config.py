"""AltCLIPConfig: BAAI/AltCLIP defaults, reading transformers' config.json, and clear errors."""

from __future__ import annotations

import json

import pytest

from altclip_fast import AltCLIPConfig, ConfigError
from altclip_fast.modeling.config import AltCLIPTextConfig, AltCLIPVisionConfig


def test_defaults_are_baai_altclip():
    c = AltCLIPConfig()
    t, v = c.text_config, c.vision_config
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.intermediate_size) == (24, 1024, 16, 4096)
    assert (t.vocab_size, t.max_position_embeddings, t.project_dim, t.hidden_act) == (250002, 514, 768, "gelu")
    assert (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.intermediate_size) == (24, 1024, 16, 4096)
    assert (v.image_size, v.patch_size, v.hidden_act, v.num_positions) == (224, 14, "quick_gelu", 257)
    assert c.projection_dim == 768
    assert t.max_text_length == 512  # 514 positions, counting from pad_token_id + 1 = 2


def test_reads_what_transformers_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AltCLIPConfig(
        text_config=dict(hidden_size=60, num_attention_heads=3, num_hidden_layers=2, project_dim=20),
        vision_config=dict(hidden_size=80, num_attention_heads=5, image_size=50, patch_size=7),
        projection_dim=12,
    )
    hf.save_pretrained(tmp_path)
    c = AltCLIPConfig.from_pretrained(tmp_path)
    for ours, theirs in ((c.text_config, hf.text_config), (c.vision_config, hf.vision_config)):
        for name in ours.to_dict():
            if name != "model_type" and hasattr(theirs, name):  # transformers 5 dropped position_embedding_type
                assert getattr(ours, name) == getattr(theirs, name), name
    assert c.projection_dim == 12


def test_missing_fields_take_transformers_defaults():
    transformers = pytest.importorskip("transformers")
    c = AltCLIPConfig.from_dict({"model_type": "altclip", "text_config": {}, "vision_config": {}})
    theirs = transformers.AltCLIPConfig(text_config={}, vision_config={})
    for ours, ref in ((c.text_config, theirs.text_config), (c.vision_config, theirs.vision_config)):
        for name in ours.to_dict():
            if name != "model_type" and hasattr(ref, name):
                assert getattr(ours, name) == getattr(ref, name), name


def test_legacy_config_dict_sections_override():
    c = AltCLIPConfig.from_dict({
        "model_type": "altclip",
        "text_config": {"hidden_size": 64, "num_attention_heads": 4},
        "text_config_dict": {"num_attention_heads": 8},
        "vision_config_dict": {"hidden_size": 96, "num_attention_heads": 6},
    })
    # As transformers: the `_dict` copy, completed with transformers' defaults, replaces the section
    # (tests/altclip_fast/modeling/test_m9_m18.py compares with transformers reading such a file).
    assert (c.text_config.hidden_size, c.text_config.num_attention_heads) == (1024, 8)
    assert (c.vision_config.hidden_size, c.vision_config.patch_size) == (96, 32)


def test_round_trip():
    c = AltCLIPConfig(text_config={"hidden_size": 40, "num_attention_heads": 2}, projection_dim=12)
    again = AltCLIPConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c


@pytest.mark.parametrize(
    "data, words",
    [
        ({"text_config": {}, "vision_config": {}}, ["model_type"]),
        ({"model_type": "clip", "text_config": {}, "vision_config": {}}, ["model_type", "clip"]),
        ({"model_type": "altclip", "vision_config": {}}, ["text_config"]),
        ({"model_type": "altclip", "text_config": {}}, ["vision_config"]),
        ({"model_type": "altclip", "text_config": {"hidden_size": 1000}, "vision_config": {}},
         ["text_config.hidden_size", "text_config.num_attention_heads"]),
        ({"model_type": "altclip", "text_config": {}, "vision_config": {"hidden_size": 100, "num_attention_heads": 16}},
         ["vision_config.hidden_size"]),
        ({"model_type": "altclip", "text_config": {"num_hidden_layers": "24"}, "vision_config": {}},
         ["text_config.num_hidden_layers", "int"]),
        ({"model_type": "altclip", "text_config": {"hidden_act": "relu"}, "vision_config": {}},
         ["text_config.hidden_act", "relu"]),
        ({"model_type": "altclip", "text_config": {}, "vision_config": {"patch_size": 300}},
         ["vision_config.patch_size"]),
        ({"model_type": "altclip", "text_config": {}, "vision_config": {"image_size": 0}},
         ["vision_config.image_size", "positive"]),
        ({"model_type": "altclip", "text_config": {"model_type": "xlm-roberta"}, "vision_config": {}},
         ["text_config.model_type"]),
        ({"model_type": "altclip", "text_config": [], "vision_config": {}}, ["text_config"]),
        ({"model_type": "altclip", "text_config": {}, "vision_config": {}, "projection_dim": -1}, ["projection_dim"]),
    ],
)
def test_bad_configs_name_the_field(data, words):
    with pytest.raises(ConfigError) as info:
        AltCLIPConfig.from_dict(data)
    for word in words:
        assert word in str(info.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        AltCLIPConfig.from_pretrained(tmp_path)  # directory without config.json
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        AltCLIPConfig.from_pretrained(tmp_path)


def test_tower_configs_standalone():
    assert AltCLIPTextConfig.from_dict({"model_type": "altclip_text_model", "hidden_size": 64}).hidden_size == 64
    with pytest.raises(ConfigError, match="model_type"):
        AltCLIPVisionConfig.from_dict({"model_type": "altclip_text_model"})
