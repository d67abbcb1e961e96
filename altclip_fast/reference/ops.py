"""Plain PyTorch reference ops: the ground truth that the Triton kernels are tested against.

Every op computes in fp32 whatever the input dtype, and returns the input dtype, so a kernel's
low-precision error can be measured against an fp32 answer (the three-way rule in tests/kernels).

Layouts match the kernels':
- attention, padded: q, k, v are ``[batch, seq, heads, head_dim]``; ``key_padding_mask`` is
  ``[batch, seq]`` with True (or 1) marking a real token.
- attention, packed: ``[total_tokens, heads, head_dim]`` with FlashAttention-style ``cu_seqlens``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "attention_varlen",
    "add_layer_norm",
    "gelu",
    "quick_gelu",
    "get_activation",
    "linear",
]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact non-causal softmax attention over ``[batch, seq, heads, head_dim]`` tensors.

    Query rows whose keys are all masked out return zeros (a softmax over nothing has no answer;
    zeros are what a caller can ignore safely, NaN would poison a whole batch).
    """
    out_dtype = q.dtype
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        keep = key_padding_mask.bool()[:, None, None, :]
        scores = scores.masked_fill(~keep, float("-inf"))
        any_key = keep.any(dim=-1, keepdim=True)
        scores = torch.where(any_key, scores, torch.zeros_like(scores))
    probs = torch.softmax(scores, dim=-1)
    if key_padding_mask is not None:
        probs = probs * any_key
    out = torch.matmul(probs, vf).transpose(1, 2)
    return out.to(out_dtype)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed sequences: ``[total_tokens, heads, head_dim]``, sequence ``i`` is rows
    ``cu_seqlens[i]:cu_seqlens[i+1]``. Tokens attend only within their own sequence."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[start:end] = attention(q[None, start:end], k[None, start:end], v[None, start:end], scale=scale)[0]
    return out


def add_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    x_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + x_bias + residual`` then ``y = LayerNorm(s)`` over the last dim.

    Returns ``(y, s)``, both in ``x``'s dtype. ``s`` is the pre-norm sum: the residual stream of a
    pre-LN layer. Post-LN (``LN(dense_out + bias + residual)``) and pre-LN (``h = h + attn_out;
    LN2(h)``) are the same op with different arguments.
    """
    s = x.float()
    if x_bias is not None:
        s = s + x_bias.float()
    if residual is not None:
        s = s + residual.float()
    y = F.layer_norm(s, (s.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return y.to(x.dtype), s.to(x.dtype)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, as XLM-R uses."""
    xf = x.float()
    return (0.5 * xf * (1.0 + torch.erf(xf / math.sqrt(2.0)))).to(x.dtype)


# The oracle's own copy, deliberately independent (the fast model's is altclip_fast.kernels.activations): a shared bug would hide from parity tests.
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)``, as CLIP's vision tower uses."""
    xf = x.float()
    return (xf * torch.sigmoid(1.702 * xf)).to(x.dtype)


_ACTIVATIONS = {None: lambda t: t, "gelu": gelu, "quick_gelu": quick_gelu}


def get_activation(name: str | None):
    """The activation function called ``name`` (None is the identity)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(k for k in _ACTIVATIONS if k)} or None, got {name!r}") from None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ weight.T + bias) (+ residual)`` computed in fp32, returned in ``x``'s dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    y = get_activation(activation)(y)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)
