"""kernels.attention rejects bad input with a TypeError/ValueError that names the argument, before any
launch (never a Triton crash or a silently wrong answer)."""

from __future__ import annotations

import importlib

import pytest
import torch

from altclip_fast.kernels import attention

# `kernels.attention` the attribute is the function; the module is reached through importlib.
attention_module = importlib.import_module("altclip_fast.kernels.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _padded(batch=2, seq=5, heads=2, head_dim=16, dtype=torch.float32):
    return [torch.randn(batch, seq, heads, head_dim, device=DEVICE, dtype=dtype) for _ in range(3)]


def _packed(lengths=(3, 4), heads=2, head_dim=16):
    q, k, v = (torch.randn(sum(lengths), heads, head_dim, device=DEVICE) for _ in range(3))
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu


def _raises(exc, *words):
    """pytest.raises whose message must contain every word (the argument's name first)."""
    return pytest.raises(exc, match=".*".join(words))


def test_non_tensor_inputs():
    q, k, v = _padded()
    with _raises(TypeError, "q", "torch.Tensor"):
        attention(q.tolist(), k, v)
    with _raises(TypeError, "v", "torch.Tensor"):
        attention(q, k, None)


def test_dtypes():
    q, k, v = _padded()
    with _raises(TypeError, "q", "dtype"):
        attention(q.to(torch.int32), k, v)
    with _raises(TypeError, "k", "dtype"):
        attention(q, k.half(), v)
    with _raises(TypeError, "v", "dtype"):
        attention(q, k, v.double())


def test_ranks_and_layouts():
    q, k, v = _padded()
    with _raises(ValueError, "q", "4 dims"):
        attention(q[0], k, v)
    with _raises(ValueError, "k", "4 dims"):
        attention(q, k[..., None], v)
    cu = _packed()[3]
    with _raises(ValueError, "q", "3 dims"):
        attention(q, k, v, cu_seqlens=cu)


def test_head_dim_limit():
    q, k, v = _padded(head_dim=136)
    with _raises(ValueError, "head_dim", "128"):
        attention(q, k, v)


def test_mismatched_shapes():
    q, k, v = _padded()
    with _raises(ValueError, "k", "v"):
        attention(q, k, v[:, :3])
    with _raises(ValueError, "k", "heads"):
        attention(q, k[:, :, :1], v[:, :, :1])
    with _raises(ValueError, "k", "batch"):
        attention(q, k[:1], v[:1])
    pq, pk, pv, cu = _packed()
    with _raises(ValueError, "k", "packed"):
        attention(pq, pk[:-1], pv[:-1], cu_seqlens=cu)


def test_last_dim_must_be_contiguous():
    q, k, v = _padded()
    with _raises(ValueError, "q", "contiguous last dimension"):
        attention(q.transpose(-1, -2).contiguous().transpose(-1, -2)[..., :8], k[..., :8], v[..., :8])


def test_device_mismatch():
    q, k, v = _padded()
    with _raises(ValueError, "k", "meta"):
        attention(q, k.to("meta"), v)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("checks the CPU path")
    monkeypatch.setattr(importlib.import_module("altclip_fast.kernels._runtime"), "INTERPRETED", False)
    with _raises(ValueError, "q", "cpu", "CUDA"):
        attention(*_padded())


def test_key_padding_mask():
    q, k, v = _padded()
    with _raises(ValueError, "key_padding_mask", "shape"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 4, dtype=torch.bool, device=DEVICE))
    with _raises(ValueError, "key_padding_mask", "2 dims"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 1, 5, dtype=torch.bool, device=DEVICE))
    with _raises(TypeError, "key_padding_mask", "dtype"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 5, device=DEVICE))
    with _raises(TypeError, "key_padding_mask", "torch.Tensor"):
        attention(q, k, v, key_padding_mask=[[1] * 5] * 2)
    pq, pk, pv, cu = _packed()
    with _raises(ValueError, "key_padding_mask", "cu_seqlens"):
        attention(pq, pk, pv, cu_seqlens=cu, key_padding_mask=torch.ones(2, 7, dtype=torch.bool, device=DEVICE))


def test_cu_seqlens():
    q, k, v, cu = _packed()
    with _raises(TypeError, "cu_seqlens", "int32"):
        attention(q, k, v, cu_seqlens=cu.long())
    with _raises(ValueError, "cu_seqlens", "1 dims"):
        attention(q, k, v, cu_seqlens=cu[None])
    with _raises(ValueError, "cu_seqlens", "empty"):
        attention(q, k, v, cu_seqlens=cu[:0])
    with _raises(TypeError, "cu_seqlens", "torch.Tensor"):
        attention(q, k, v, cu_seqlens=[0, 3, 7])


def test_max_seqlen():
    q, k, v, cu = _packed()
    with _raises(TypeError, "max_seqlen", "int"):
        attention(q, k, v, cu_seqlens=cu, max_seqlen=4.0)
    with _raises(TypeError, "max_seqlen", "int"):
        attention(q, k, v, cu_seqlens=cu, max_seqlen=torch.tensor(4))
    with _raises(ValueError, "max_seqlen", ">= 0"):
        attention(q, k, v, cu_seqlens=cu, max_seqlen=-1)
    with _raises(ValueError, "max_seqlen", "cu_seqlens"):
        attention(*_padded(), max_seqlen=5)


def test_scale():
    q, k, v = _padded()
    with _raises(TypeError, "scale", "float"):
        attention(q, k, v, scale="0.1")
    with _raises(TypeError, "scale", "float"):
        attention(q, k, v, scale=torch.tensor(0.1))
    with _raises(ValueError, "scale", "finite"):
        attention(q, k, v, scale=float("nan"))


def test_layout_arguments_are_keyword_only():
    q, k, v = _padded()
    with pytest.raises(TypeError):
        attention(q, k, v, None)
