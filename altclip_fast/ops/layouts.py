"""Attention layouts, and the one eager attention of the library.

A layout says how the token rows of a ``[tokens, features]`` matrix form sequences: a padded batch
(``PaddedLayout``) or sequences packed back to back without padding (``PackedLayout``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["PaddedLayout", "PackedLayout", "explicit_attention", "padded_qkv", "padded_kv"]


@dataclass
class PaddedLayout:
    """``batch * seqlen`` token rows, sequence-major. ``key_padding_mask`` ``[batch, seqlen]`` marks real
    tokens (True); None means every token is real. Masked keys get transformers' additive mask
    (``finfo.min``), so even a fully masked row gives transformers' answer."""

    batch: int
    seqlen: int
    key_padding_mask: torch.Tensor | None = None
    _additive: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.batch * self.seqlen

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``[batch, 1, 1, seqlen]``: 0 for real keys, ``finfo(dtype).min`` for padding."""
        if self.key_padding_mask is None:
            return None
        if dtype not in self._additive:
            keep = self.key_padding_mask.bool()[:, None, None, :]
            zero = torch.zeros((), dtype=dtype, device=keep.device)
            self._additive[dtype] = torch.where(keep, zero, torch.finfo(dtype).min)
        return self._additive[dtype]


@dataclass
class PackedLayout:
    """Sequences packed back to back without padding (FlashAttention's varlen layout).

    ``cu_seqlens`` (int32, ``[batch + 1]``) bounds sequence ``i`` to rows ``cu_seqlens[i]:cu_seqlens[i+1]``;
    ``max_seqlen`` is an upper bound on their lengths. ``grid_index`` places each packed row in a
    ``[batch, grid_seqlen]`` grid, for backends that attend over a padded grid.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    grid_index: torch.Tensor
    grid: PaddedLayout
    _scratch: dict = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return self.grid.batch

    @property
    def num_tokens(self) -> int:
        return self.grid_index.numel()

    def scatter_to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` placed in a zero-padded ``[batch * grid_seqlen, features]`` grid. The grid is reused
        by every layer of a forward: each call overwrites the same real positions and the padding
        stays zero (padded keys must hold finite values: masked-out weights are 0, and 0 * NaN is NaN)."""
        key = (rows.dtype, rows.device, rows.shape[-1])
        grid = self._scratch.get(key)
        if grid is None:
            grid = self._scratch[key] = rows.new_zeros((self.grid.num_tokens, rows.shape[-1]))
        return grid.index_copy_(0, self.grid_index, rows)

    @classmethod
    def from_mask(cls, keep: torch.Tensor) -> "PackedLayout":
        """The packing of the True entries of ``keep`` ``[batch, seqlen]``, in row-major order."""
        batch, seqlen = keep.shape
        lengths = keep.sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        grid_index = keep.reshape(-1).nonzero().squeeze(1)
        return cls(cu_seqlens, seqlen, grid_index, PaddedLayout(batch, seqlen, keep))


def padded_qkv(qkv: torch.Tensor, num_heads: int, layout: PaddedLayout):
    """Views ``q, k, v`` ``[batch, heads, seq, head_dim]`` of a fused projection, without copies."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return qkv.view(layout.batch, layout.seqlen, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def padded_kv(kv: torch.Tensor, num_heads: int, layout: PaddedLayout):
    """Views ``k, v`` ``[batch, seq, heads, head_dim]`` of a fused key/value projection ``[tokens, 2 * hidden]``."""
    head_dim = kv.shape[-1] // (2 * num_heads)
    return kv.view(layout.batch, layout.seqlen, 2, num_heads, head_dim).unbind(2)


def explicit_attention(qkv: torch.Tensor, num_heads: int, layout: PaddedLayout, scale: float | None = None):
    """Attention that materialises the probabilities, for ``output_attentions``: it costs an
    ``[batch, heads, seq, seq]`` tensor per layer and runs at plain-matmul speed on every backend.

    Returns ``(out [tokens, hidden], probs [batch, heads, seq, seq])`` computed as transformers'
    eager attention does (scores in the input dtype, softmax in fp32).
    """
    q, k, v = padded_qkv(qkv, num_heads, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = layout.additive_mask(scores.dtype)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qkv.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(layout.num_tokens, -1), probs
