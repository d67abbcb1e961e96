"""The transformer encoder layer shared by both towers.

Text (XLM-R) layers are post-LN with exact GELU; vision (CLIP ViT) layers are pre-LN with quick_gelu.
Both are the same computation with two knobs, so there is one class:

    post-LN:  x1 = LN1(x + Attn(x));          out = LN2(x1 + MLP(x1))
    pre-LN:   h  = x + Attn(LN1(x));          out = h + MLP(LN2(h))

Q, K and V are one ``[3 * hidden, hidden]`` matrix (fused once at load). Rows are tokens: a layer
takes ``x`` as ``[tokens, hidden]`` and an attention layout saying how rows form sequences, so the same
code runs padded batches and packed (unpadded) text.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.dispatch import QUICK_GELU_ALPHA, PaddedLayout, explicit_attention

__all__ = ["EncoderLayer"]


class EncoderLayer(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        *,
        eps: float,
        activation: str,
        pre_norm: bool,
        device=None,
        dtype=None,
    ):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.scale = (hidden_size // num_heads) ** -0.5
        self.eps = eps
        self.activation = activation
        self.pre_norm = pre_norm
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, **kw)
        self.out = nn.Linear(hidden_size, hidden_size, **kw)
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps, **kw)
        self.fc1 = nn.Linear(hidden_size, intermediate_size, **kw)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, **kw)
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps, **kw)
        # True while fc1 holds QUICK_GELU_ALPHA * (its checkpoint weight and bias) and fc2.weight holds
        # its checkpoint weight / QUICK_GELU_ALPHA: then silu between them is exactly quick_gelu.
        self.quick_gelu_folded = False

    @staticmethod
    def quick_gelu_fold_factors(folded: bool) -> tuple[tuple[str, float], ...]:
        """(parameter name, factor) turning the checkpoint form into the folded form (``folded``) or back."""
        a = QUICK_GELU_ALPHA if folded else 1.0 / QUICK_GELU_ALPHA
        return (("fc1.weight", a), ("fc1.bias", a), ("fc2.weight", 1.0 / a))

    @torch.no_grad()
    def set_quick_gelu_folded(self, folded: bool) -> None:
        """Switch the MLP weights between the checkpoint form and the silu-folded form (see dispatch).
        Loading folds in fp32 before the dtype conversion; this in-place switch (used when a model moves
        to another device or backend) rounds once more in low precision."""
        if folded == self.quick_gelu_folded:
            return
        if self.activation != "quick_gelu":
            raise ValueError(f"only quick_gelu layers fold into silu, this one uses {self.activation}")
        params = dict(self.named_parameters())
        for name, factor in self.quick_gelu_fold_factors(folded):
            params[name].copy_(params[name].float().mul_(factor))
        self.quick_gelu_folded = folded

    def _mlp_activation(self, ops, x: torch.Tensor) -> str:
        if self.activation != "quick_gelu":
            return self.activation
        fold = ops.folds_quick_gelu(x.device, x.dtype)
        if fold != self.quick_gelu_folded:
            # The weights were laid out for another device or backend (the model was moved): re-lay once.
            self.set_quick_gelu_folded(fold)
        return "silu" if fold else "quick_gelu"

    def _kept_rows_attention(self, ops, attn_in, layout, keep_rows):
        """Attention output ``[len(keep_rows), hidden]`` for one query row per sequence: the query
        projection runs for those rows only, the key/value projection (the fused weight's lower two
        thirds, a view) for all."""
        hidden = self.out.weight.shape[0]
        weight, bias = self.qkv.weight, self.qkv.bias
        q = ops.linear(attn_in.index_select(0, keep_rows), weight[:hidden], bias[:hidden])
        kv = ops.linear(attn_in, weight[hidden:], bias[hidden:])
        return ops.query_attention(q, kv, self.num_heads, layout, self.scale)

    def forward(
        self,
        x: torch.Tensor,
        layout,
        ops,
        *,
        keep_rows: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x``: ``[tokens, hidden]``. Returns the layer output and, with ``output_attentions``, the
        attention probabilities (which needs a ``PaddedLayout``).

        ``keep_rows``: one row of each sequence, in sequence order (the pooled tokens of a last layer
        whose other outputs nobody reads). Only these rows get queries, attention and everything after
        it; keys and values still come from every row. The output then has ``len(keep_rows)`` rows.
        """
        act = self._mlp_activation(ops, x)
        attn_in = ops.layer_norm(x, self.norm1.weight, self.norm1.bias, self.eps) if self.pre_norm else x
        probs = None
        if keep_rows is not None:
            if output_attentions:
                raise ValueError("keep_rows computes attention for the kept rows only: no attention maps")
            attn, x = self._kept_rows_attention(ops, attn_in, layout, keep_rows), x.index_select(0, keep_rows)
        else:
            qkv = ops.linear(attn_in, self.qkv.weight, self.qkv.bias)
            if output_attentions:
                if not isinstance(layout, PaddedLayout):
                    raise ValueError("output_attentions needs a padded layout")
                attn, probs = explicit_attention(qkv, self.num_heads, layout, self.scale)
            else:
                attn = ops.attention(qkv, self.num_heads, layout, self.scale)
        if self.pre_norm:
            mlp_in, h = ops.linear_add_layer_norm(
                attn, self.out.weight, self.out.bias, x, self.norm2.weight, self.norm2.bias, self.eps, return_sum=True
            )
            hidden = ops.linear(mlp_in, self.fc1.weight, self.fc1.bias, activation=act)
            return ops.linear(hidden, self.fc2.weight, self.fc2.bias, residual=h), probs
        x1 = ops.linear_add_layer_norm(
            attn, self.out.weight, self.out.bias, x, self.norm1.weight, self.norm1.bias, self.eps
        )
        hidden = ops.linear(x1, self.fc1.weight, self.fc1.bias, activation=act)
        out = ops.linear_add_layer_norm(
            hidden, self.fc2.weight, self.fc2.bias, x1, self.norm2.weight, self.norm2.bias, self.eps
        )
        return out, probs
