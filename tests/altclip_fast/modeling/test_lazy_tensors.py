"""Reading safetensors files a tensor (and a slice) at a time: the values are the file's, as
safetensors itself reads them, converted exactly as ``Tensor.to`` converts; a damaged file is a
CheckpointError; and loading through it leaves no file open."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from altclip_fast import CheckpointError
from altclip_fast.modeling import lazy_tensors
from altclip_fast.modeling.checkpoint import read_state_dict
from altclip_fast.modeling.lazy_tensors import LazyStateDict, open_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(37, 29, generator=gen),
        "bf16": torch.randn(5, 7, 3, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(11, generator=gen).to(torch.float16),
        "i64": torch.randint(-(2**40), 2**40, (13,), generator=gen),
        "bool": torch.rand(9, generator=gen) > 0.5,
        "scalar": torch.tensor(2.6592),
        "empty": torch.empty(0, 4),
    }


@pytest.fixture
def file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("chunk", [7, 64, lazy_tensors.CHUNK_BYTES])
def test_values_are_safetensors_own(file, chunk, monkeypatch):
    monkeypatch.setattr(lazy_tensors, "CHUNK_BYTES", chunk)  # several slices per tensor, ragged tails
    lazy = open_safetensors([file])
    want = load_file(str(file))
    assert sorted(lazy) == sorted(want)
    for key, tensor in want.items():
        got = lazy[key]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
        assert torch.equal(got, tensor), key
        assert lazy.spec(key) == (tensor.dtype, tensor.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_read_into_rounds_once_like_to(file, dtype, monkeypatch):
    monkeypatch.setattr(lazy_tensors, "CHUNK_BYTES", 40)
    lazy = open_safetensors([file])
    source = load_file(str(file))["f32"]
    out = torch.empty(source.shape, dtype=dtype)
    lazy.read_into("f32", out)
    assert torch.equal(out, source.to(dtype))


def test_read_into_a_strided_destination(file):
    lazy = open_safetensors([file])
    grid = torch.zeros(29, 37)
    lazy.read_into("f32", grid.t())  # a transposed view: not contiguous
    assert torch.equal(grid.t(), load_file(str(file))["f32"])
    with pytest.raises(ValueError, match="f32"):
        lazy.read_into("f32", torch.empty(29, 37))


def test_rekeyed_reads_nothing_and_refuses_collisions(file):
    lazy = open_safetensors([file])
    renamed = lazy.rekeyed(lambda k: None if k == "bool" else "x." + k)
    assert isinstance(renamed, LazyStateDict)
    assert sorted(renamed) == sorted("x." + k for k in _tensors() if k != "bool")
    assert torch.equal(renamed["x.i64"], _tensors()["i64"])
    with pytest.raises(CheckpointError, match="twice"):
        lazy.rekeyed(lambda k: "same")


def test_truncated_file_is_a_checkpoint_error(file):
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="could not be read.*past the end.*truncated or corrupt"):
        open_safetensors([file])
    file.write_bytes(data[:6])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_safetensors([file])


def test_shards_read_lazily_as_one_state_dict(tmp_path):
    tensors = _tensors()
    keys = sorted(tensors)
    names = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(tmp_path / name))
        names.update({k: name for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(
        __import__("json").dumps({"metadata": {}, "weight_map": names})
    )
    state = read_state_dict(tmp_path)
    assert isinstance(state, LazyStateDict)
    assert sorted(state) == keys
    for key in keys:
        assert torch.equal(state[key], tensors[key]), key


def _open_paths() -> set[str]:
    return {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to list open files")
def test_release_closes_the_files(file):
    lazy = open_safetensors([file])
    lazy["f32"]
    assert str(file.resolve()) in _open_paths()
    lazy.release()
    assert str(file.resolve()) not in _open_paths()
    assert torch.equal(lazy["f16"], _tensors()["f16"])  # reading again reopens
    lazy.release()
