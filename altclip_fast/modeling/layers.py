"""The transformer encoder layer shared by both towers.

Text (XLM-R) layers are post-LN with exact GELU; vision (CLIP ViT) layers are pre-LN with quick_gelu.
Both are the same computation with two knobs, so there is one class:

    post-LN:  x1 = LN1(x + Attn(x));          out = LN2(x1 + MLP(x1))
    pre-LN:   h  = x + Attn(LN1(x));          out = h + MLP(LN2(h))

Q, K and V are one ``[3 * hidden, hidden]`` matrix (fused once at load). Rows are tokens: a layer
takes ``x`` as ``[tokens, hidden]`` and an attention layout saying how rows form sequences, so the same
code runs padded batches and packed (unpadded) text.

Forward runs the weights as the backend's prepare step left them (``prepare``): the parameters
themselves, or copies derived from them (quick_gelu folded into SiLU, weights pre-blocked for oneDNN).
The parameters always hold the checkpoint's values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..ops import Ops, PaddedLayout, explicit_attention

__all__ = ["EncoderLayer", "derived_nbytes"]


def derived_nbytes(tensors: Iterable[torch.Tensor | None], params: Iterable[torch.Tensor]) -> int:
    """Bytes of those ``tensors`` that are copies, not (views of) any of ``params``."""
    own = {p.untyped_storage().data_ptr() for p in params if p.device.type != "meta"}
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        # Pre-blocked oneDNN weights are opaque: no storage to compare, and always a copy.
        if t.is_mkldnn or t.untyped_storage().data_ptr() not in own:
            total += t.numel() * t.element_size()
    return total


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
        # What forward runs (see `prepare`): a plain dict, so neither state_dict nor .to() sees it.
        self._prepared: dict[str, torch.Tensor | None] | None = None
        self._mlp_act = activation

    def _plain(self) -> dict[str, torch.Tensor | None]:
        hidden = self.out.weight.shape[0]
        w, b = self.qkv.weight, self.qkv.bias
        return {
            "qkv.weight": w, "qkv.bias": b, "out.weight": self.out.weight, "out.bias": self.out.bias,
            "fc1.weight": self.fc1.weight, "fc1.bias": self.fc1.bias,
            "fc2.weight": self.fc2.weight, "fc2.bias": self.fc2.bias,
            "q.weight": w[:hidden], "q.bias": b[:hidden], "kv.weight": w[hidden:], "kv.bias": b[hidden:],
        }

    @torch.no_grad()
    def prepare(self, ops: Ops | None, sources: Mapping[torch.Tensor, torch.Tensor] | None = None, *,
                query_rows: bool = False) -> None:
        """Derive the forms of this layer's weights that ``ops`` runs (``Ops.prepare_weight`` /
        ``prepare_mlp``); ``None`` drops them (forward then runs the parameters). The owning model calls
        this at load and whenever its device, dtype or backend changes, and again after in-place
        changes of the parameters.

        ``sources``: parameter -> the checkpoint tensor it was loaded from, so that a fold is rounded
        once from the checkpoint's precision. ``query_rows``: also prepare the separate query and
        key/value projections that ``forward(keep_rows=...)`` runs (a tower's last layer); elsewhere
        they stay views of the fused weight.
        """
        if ops is None:
            self._prepared, self._mlp_act = None, self.activation
            return
        plain = self._plain()
        sources = sources or {}
        originals = None
        if self.fc1.weight in sources:
            originals = (sources[self.fc1.weight], sources.get(self.fc1.bias), sources[self.fc2.weight])
        w1, b1, w2, act = ops.prepare_mlp(self.fc1.weight, self.fc1.bias, self.fc2.weight, self.activation,
                                          sources=originals)
        plain.update({"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2})
        weights = ["qkv.weight", "out.weight", "fc1.weight", "fc2.weight"] + (["q.weight", "kv.weight"] if query_rows else [])
        plain.update({name: ops.prepare_weight(plain[name]) for name in weights})
        self._prepared, self._mlp_act = plain, act

    @property
    def prepared(self) -> Mapping[str, torch.Tensor | None]:
        """The tensors forward runs, by name (``"fc1.weight"`` ...): parameters or derived copies."""
        return dict(self._prepared if self._prepared is not None else self._plain())

    def derived_nbytes(self) -> int:
        """Bytes held by derived copies of the weights (0 when forward runs the parameters themselves)."""
        if self._prepared is None:
            return 0
        return derived_nbytes(self._prepared.values(), self.parameters())

    def _kept_rows_attention(self, ops, w, attn_in, layout, keep_rows):
        """Attention output ``[len(keep_rows), hidden]`` for one query row per sequence: the query
        projection runs for those rows only, the key/value projection (the fused weight's lower two
        thirds) for all."""
        q = ops.linear(attn_in.index_select(0, keep_rows), w["q.weight"], w["q.bias"])
        kv = ops.linear(attn_in, w["kv.weight"], w["kv.bias"])
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
        attention probabilities (which needs a ``PaddedLayout``). ``ops`` must be the op set the layer
        was last prepared for (or any, if it never was).

        ``keep_rows``: one row of each sequence, in sequence order (the pooled tokens of a last layer
        whose other outputs nobody reads). Only these rows get queries, attention and everything after
        it; keys and values still come from every row. The output then has ``len(keep_rows)`` rows.
        """
        w = self._prepared if self._prepared is not None else self._plain()
        act = self._mlp_act
        attn_in = ops.layer_norm(x, self.norm1.weight, self.norm1.bias, self.eps) if self.pre_norm else x
        probs = None
        if keep_rows is not None:
            if output_attentions:
                raise ValueError("keep_rows computes attention for the kept rows only: no attention maps")
            attn, x = self._kept_rows_attention(ops, w, attn_in, layout, keep_rows), x.index_select(0, keep_rows)
        else:
            qkv = ops.linear(attn_in, w["qkv.weight"], w["qkv.bias"])
            if output_attentions:
                if not isinstance(layout, PaddedLayout):
                    raise ValueError("output_attentions needs a padded layout")
                attn, probs = explicit_attention(qkv, self.num_heads, layout, self.scale)
            else:
                attn = ops.attention(qkv, self.num_heads, layout, self.scale)
        if self.pre_norm:
            mlp_in, h = ops.linear_add_layer_norm(
                attn, w["out.weight"], w["out.bias"], x, self.norm2.weight, self.norm2.bias, self.eps, return_sum=True
            )
            hidden = ops.linear(mlp_in, w["fc1.weight"], w["fc1.bias"], activation=act)
            return ops.linear(hidden, w["fc2.weight"], w["fc2.bias"], residual=h), probs
        x1 = ops.linear_add_layer_norm(
            attn, w["out.weight"], w["out.bias"], x, self.norm1.weight, self.norm1.bias, self.eps
        )
        hidden = ops.linear(x1, w["fc1.weight"], w["fc1.bias"], activation=act)
        out = ops.linear_add_layer_norm(
            hidden, w["fc2.weight"], w["fc2.bias"], x1, self.norm2.weight, self.norm2.bias, self.eps
        )
        return out, probs
