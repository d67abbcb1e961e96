"""Checkpoint reading: every file format and key layout, and a clear error for every way it can go wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import altclip_fast.reference as reference
from altclip_fast import CheckpointError
from altclip_fast.modeling.checkpoint import canonicalize_keys, load_checkpoint, read_state_dict
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
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A transformers save_pretrained directory and the tensors it holds."""
    directory = save_hf(random_hf_model(CONFIG, seed=3), tmp_path_factory.mktemp("hf"))
    return directory, load_file(directory / "model.safetensors")


@pytest.fixture(scope="module")
def expected(saved):
    """Outputs of the model loaded from transformers' own file: what every other layout must give."""
    return run(reference.AltCLIPModel.from_pretrained(saved[0]))


@torch.no_grad()
def run(model):
    ids, mask = make_text_batch(CONFIG, [4, 6], seed=0)
    return model(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(CONFIG, 2)).logits_per_image


def test_loads_every_parameter_from_the_file(saved):
    directory, tensors = saved
    model = reference.AltCLIPModel.from_pretrained(directory)
    state = model.state_dict()
    canonical = canonicalize_keys(tensors)
    assert set(state) == set(canonical)
    for name, value in canonical.items():
        assert torch.equal(state[name], value), name  # nothing left at an initial value


def test_transformers4_layout_pytorch_bin_with_stale_buffers(saved, expected, tmp_path):
    directory, tensors = saved
    old = to_transformers4_layout(tensors, CONFIG)
    assert any(k.startswith("vision_model.encoder.layers.0.") for k in old)
    assert "vision_model.embeddings.position_ids" in old
    save_raw(old, CONFIG, tmp_path, fmt="bin")
    assert torch.equal(run(reference.AltCLIPModel.from_pretrained(tmp_path)), expected)


def test_sharded_safetensors(saved, expected, tmp_path):
    save_raw(saved[1], CONFIG, tmp_path, fmt="safetensors", shards=3)
    assert len(list(tmp_path.glob("model-*-of-00003.safetensors"))) == 3
    assert torch.equal(run(reference.AltCLIPModel.from_pretrained(tmp_path)), expected)


def test_safetensors_preferred_over_bin(saved, expected, tmp_path):
    save_raw(saved[1], CONFIG, tmp_path, fmt="safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never read")
    assert torch.equal(run(reference.AltCLIPModel.from_pretrained(tmp_path)), expected)


def test_dtype_and_towers(saved):
    directory = saved[0]
    model = reference.AltCLIPModel.from_pretrained(directory, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    text = load_checkpoint(directory, "text")
    assert all(not k.startswith(("text_model.", "vision_model.")) for k in text.state_dict)
    with pytest.raises(ValueError, match="dtype"):
        reference.AltCLIPModel.from_pretrained(directory, dtype="int8")


def _mutated(saved, tmp_path, mutate):
    tensors = dict(saved[1])
    mutate(tensors)
    save_raw(tensors, CONFIG, tmp_path, fmt="safetensors")
    with pytest.raises(CheckpointError) as info:
        reference.AltCLIPModel.from_pretrained(tmp_path)
    return str(info.value)


def test_missing_key_is_named(saved, tmp_path):
    key = "text_model.roberta.encoder.layer.1.output.dense.weight"
    message = _mutated(saved, tmp_path, lambda t: t.pop(key))
    assert "missing keys (1)" in message and key in message


def test_unexpected_key_is_named(saved, tmp_path):
    message = _mutated(saved, tmp_path, lambda t: t.update({"text_model.pooler.dense.weight": torch.zeros(2, 2)}))
    assert "unexpected keys (1)" in message and "text_model.pooler.dense.weight" in message


def test_shape_mismatch_names_key_and_shapes(saved, tmp_path):
    key = "vision_model.post_layernorm.weight"
    message = _mutated(saved, tmp_path, lambda t: t.update({key: torch.ones(7)}))
    assert key in message and "(7,)" in message and f"({CONFIG.vision_config.hidden_size},)" in message


def test_config_that_does_not_fit_the_weights(saved, tmp_path):
    other = tiny_config(text_hidden=60, text_heads=3)
    save_raw(saved[1], other, tmp_path, fmt="safetensors")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        reference.AltCLIPModel.from_pretrained(tmp_path)


def test_truncated_safetensors(saved, tmp_path):
    save_raw(saved[1], CONFIG, tmp_path, fmt="safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors could not be read.*corrupt"):
        reference.AltCLIPModel.from_pretrained(tmp_path)


def test_corrupt_pytorch_bin(saved, tmp_path):
    save_raw(saved[1], CONFIG, tmp_path, fmt="bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="pytorch_model.bin could not be read"):
        reference.AltCLIPModel.from_pretrained(tmp_path)


def test_pickled_code_is_refused(tmp_path, saved):
    (tmp_path / "config.json").write_text((saved[0] / "config.json").read_text())
    torch.save({"weights": torch.zeros(1), "payload": os.system}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin could not be read"):
        read_state_dict(tmp_path)


def test_missing_shard(saved, tmp_path):
    save_raw(saved[1], CONFIG, tmp_path, fmt="safetensors", shards=2)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="names shard model-00002-of-00002.safetensors, which is missing"):
        reference.AltCLIPModel.from_pretrained(tmp_path)


def test_directory_without_weights(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="has no weights: expected one of model.safetensors"):
        reference.AltCLIPModel.from_pretrained(tmp_path)


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        reference.AltCLIPModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no such directory"):
        reference.AltCLIPModel.from_pretrained("./relative/nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        reference.AltCLIPModel.from_pretrained(tmp_path / "file")


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(CheckpointError, match=r"pip install 'altclip-fast\[hub\]'"):
        reference.AltCLIPModel.from_pretrained("BAAI/AltCLIP")


def _python(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )


def test_hub_id_offline_and_not_cached(tmp_path):
    pytest.importorskip("huggingface_hub")
    result = _python(
        """
        import altclip_fast.reference as reference
        from altclip_fast import CheckpointError
        try:
            reference.AltCLIPModel.from_pretrained("BAAI/AltCLIP")
        except CheckpointError as e:
            print("ERROR:", e)
        """,
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "HF_HOME": str(tmp_path)},
    )
    assert "ERROR: could not get 'BAAI/AltCLIP' from the Hugging Face Hub" in result.stdout, result.stderr
    assert "Pass a local directory" in result.stdout and "HF_HUB_OFFLINE is set and the hub cache has no copy" in result.stdout


def test_hub_cache_is_used_offline(saved, tmp_path):
    """A hub id whose files sit in huggingface_hub's cache loads with HF_HUB_OFFLINE=1."""
    pytest.importorskip("huggingface_hub")
    repo = tmp_path / "models--someone--tiny-altclip"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((saved[0] / name).read_bytes())
    result = _python(
        """
        import altclip_fast.reference as reference
        m = reference.AltCLIPModel.from_pretrained("someone/tiny-altclip")
        print("LOGIT_SCALE", float(m.logit_scale))
        """,
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "HF_HOME": str(tmp_path)},
    )
    expected = float(load_file(saved[0] / "model.safetensors")["logit_scale"])
    assert f"LOGIT_SCALE {expected}" in result.stdout, result.stderr


def test_canonical_keys_fold_both_layouts():
    t = torch.zeros(1)
    keys = canonicalize_keys({
        "vision_model.encoder.layer.3.mlp.fc1.weight": t,
        "text_model.roberta.encoder.layers.2.output.dense.bias": t,
        "text_model.roberta.encoder.layer.1.output.dense.bias": t,
        "text_model.roberta.embeddings.position_ids": t,
        "vision_model.embeddings.position_ids": t,
    })
    assert sorted(keys) == [
        "text_model.roberta.encoder.layer.1.output.dense.bias",
        "text_model.roberta.encoder.layer.2.output.dense.bias",
        "vision_model.encoder.layers.3.mlp.fc1.weight",
    ]
    with pytest.raises(CheckpointError, match="twice"):
        canonicalize_keys({"vision_model.encoder.layer.0.x": t, "vision_model.encoder.layers.0.x": t})

