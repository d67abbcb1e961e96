"""reference.ops against independent float64 formulations (torch's fused ops), since the kernel
tests trust these as ground truth."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from altclip_fast.reference import ops


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("batch, seq, heads, dim", [(1, 1, 1, 16), (2, 7, 3, 20), (3, 77, 2, 64), (1, 257, 1, 80)])
def test_attention_matches_sdpa_in_float64(batch, seq, heads, dim):
    q, k, v = (randn(batch, seq, heads, dim, seed=s) for s in range(3))
    lengths = torch.tensor([seq - i % seq for i in range(batch)])
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    got = ops.attention(q, k, v, key_padding_mask=mask)
    want = F.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v)), attn_mask=mask[:, None, None, :]
    ).transpose(1, 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_attention_scale_and_fully_masked_rows():
    q, k, v = (randn(2, 5, 2, 16, seed=s) for s in range(3))
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.int32)
    got = ops.attention(q, k, v, key_padding_mask=mask, scale=0.3)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # no real key: zeros, not NaN
    want = F.scaled_dot_product_attention(
        *(t[:1].double().transpose(1, 2) for t in (q, k, v)), attn_mask=mask[:1, None, None, :].bool(), scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(got[:1].double(), want, atol=1e-5, rtol=1e-5)


def test_attention_low_precision_returns_input_dtype():
    q, k, v = (randn(1, 9, 2, 32, dtype=torch.float16, seed=s) for s in range(3))
    got = ops.attention(q, k, v)
    assert got.dtype == torch.float16
    want = ops.attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def test_attention_varlen_equals_padded_per_sequence():
    lengths = [3, 0, 1, 6]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (randn(sum(lengths), 2, 16, seed=s) for s in range(3))
    got = ops.attention_varlen(q, k, v, cu)
    for i, n in enumerate(lengths):
        a, b = cu[i].item(), cu[i + 1].item()
        if n:
            alone = ops.attention(q[None, a:b], k[None, a:b], v[None, a:b])[0]
            torch.testing.assert_close(got[a:b], alone, atol=0, rtol=0)


@pytest.mark.parametrize("hidden", [1, 40, 1000])
@pytest.mark.parametrize("with_residual, with_bias", [(False, False), (True, False), (True, True)])
def test_add_layer_norm(hidden, with_residual, with_bias):
    x = randn(7, hidden, seed=1)
    residual = randn(7, hidden, seed=2) if with_residual else None
    x_bias = randn(hidden, seed=3) if with_bias else None
    w, b = 1 + randn(hidden, seed=4), randn(hidden, seed=5)
    y, s = ops.add_layer_norm(x, w, b, residual=residual, x_bias=x_bias, eps=1e-5)
    s64 = x.double() + (0 if x_bias is None else x_bias.double()) + (0 if residual is None else residual.double())
    torch.testing.assert_close(s.double(), s64, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y.double(), F.layer_norm(s64, (hidden,), w.double(), b.double(), 1e-5), atol=1e-5, rtol=1e-5)


def test_activations():
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    torch.testing.assert_close(ops.gelu(x.float()).double(), F.gelu(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ops.quick_gelu(x.float()).double(), x * torch.sigmoid(1.702 * x), atol=1e-6, rtol=1e-6)
    assert ops.gelu(x.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.get_activation("relu")


@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu"])
def test_linear(activation):
    x, w, b, r = randn(2, 5, 24, seed=1), randn(33, 24, seed=2), randn(33, seed=3), randn(2, 5, 33, seed=4)
    got = ops.linear(x, w, b, activation=activation, residual=r)
    y = F.linear(x.double(), w.double(), b.double())
    y = {None: lambda t: t, "gelu": F.gelu, "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}[activation](y)
    torch.testing.assert_close(got.double(), y + r.double(), atol=1e-5, rtol=1e-5)
