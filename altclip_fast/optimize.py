"""``optimize(hf_model)``: speed up an already-loaded transformers AltCLIP model in place.

For users who keep transformers' model object (its processor pipeline, its outputs, its
``save_pretrained``), in the way Liger-Kernel patches LLMs: the modules stay where they are, their
``forward`` is replaced on the instance by one that runs the same math through ``altclip_fast.ops``
(Triton kernels on CUDA, oneDNN-fused torch ops on CPU). A patched module says so in its ``repr``.
One switch per kernel:

- ``attention``: one fused QKV GEMM per layer and the attention kernel (FlashAttention-style on CUDA,
  ``F.scaled_dot_product_attention`` on CPU). The fused QKV weight is a copy made now (a
  non-persistent buffer: ``3 * hidden**2`` more values per layer, not saved by ``save_pretrained``);
  call ``optimize`` again after changing the weights.
- ``layer_norm``: residual add + LayerNorm fused (and, in the text tower, the dense bias too).
- ``mlp``: linear + bias + GELU / quick_gelu fused, and the vision MLP's residual add.

Calling it again with other switches applies exactly the new set (``False`` removes a patch).
Requests for attention weights (``output_attentions=True``, or the ``eager`` implementation) run
transformers' own attention. Supports transformers >= 5 (the versions whose module signatures this
code follows); older versions get a clear error.

The backend request (``backend=``, else ``$ALTCLIP_FAST_BACKEND``) and the GEMM mode
(``$ALTCLIP_FAST_GEMM``) are read by ``optimize``; each forward maps them to its input's device. The
weights are used as they are: nothing is folded or pre-blocked for oneDNN.
"""

from __future__ import annotations

import os
import sys
import types

import torch
from torch import nn

from .ops import ENV_VAR, PaddedLayout, get_ops, resolve_backend
from .ops.gemm_choice import gemm_mode

__all__ = ["optimize"]

_BACKEND_ATTR = "_altclip_fast_backend"  # (requested backend, GEMM mode, switch name), set by optimize


def _ops_for(module: nn.Module, x: torch.Tensor):
    requested, gemm, _ = getattr(module, _BACKEND_ATTR)
    return get_ops(resolve_backend(requested, x.device), gemm=gemm)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _key_padding_mask(mask: torch.Tensor | None, batch: int, seqlen: int) -> torch.Tensor | None:
    """The ``[batch, seq]`` real-key mask behind whatever mask transformers built: 2-D (flash-style),
    4-D bool (sdpa) or 4-D additive float (eager). AltCLIP's masks only ever drop padding keys, so
    every query row of a 4-D mask is the same and row 0 says it all."""
    if mask is None:
        return None
    if mask.dim() == 4:
        mask = mask[:, 0, 0, :]
        if mask.is_floating_point():
            mask = mask == 0
    if mask.shape != (batch, seqlen):
        raise ValueError(f"cannot read a key padding mask of shape {tuple(mask.shape)} for {batch}x{seqlen} tokens")
    return mask.bool()


def _wants_weights(module: nn.Module, kwargs) -> bool:
    return bool(kwargs.get("output_attentions")) or getattr(module.config, "_attn_implementation", None) == "eager"


# --------------------------------------------------------------------------- patched forwards


def _fused_attention(self, ops, hidden_states, attention_mask, num_heads, scale):
    """Fused QKV projection + attention over a padded batch: the context rows ``[tokens, hidden]``."""
    batch, seqlen, _ = hidden_states.shape
    layout = PaddedLayout(batch, seqlen, _key_padding_mask(attention_mask, batch, seqlen))
    qkv = ops.linear(_rows(hidden_states), self._altclip_fast_qkv_weight, self._altclip_fast_qkv_bias)
    return ops.attention(qkv, num_heads, layout, scale)


def _text_self_attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    if _wants_weights(self, kwargs):
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    ops = _ops_for(self, hidden_states)
    context = _fused_attention(self, ops, hidden_states, attention_mask, self.num_attention_heads, self.scaling)
    return context.view(hidden_states.shape), None


def _vision_attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    if _wants_weights(self, kwargs):
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    ops = _ops_for(self, hidden_states)
    context = _fused_attention(self, ops, hidden_states, attention_mask, self.num_heads, self.scale)
    return ops.linear(context, self.out_proj.weight, self.out_proj.bias).view(hidden_states.shape), None


def _dense_add_norm_forward(self, hidden_states, input_tensor):
    """AltRobertaSelfOutput / AltRobertaOutput: LayerNorm(dense(x) + residual)."""
    ops = _ops_for(self, hidden_states)
    y = ops.linear_add_layer_norm(
        _rows(hidden_states), self.dense.weight, self.dense.bias, _rows(input_tensor),
        self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
    )
    return y.view(*hidden_states.shape[:-1], -1)


def _layer_norm_forward(self, x):
    ops = _ops_for(self, x)
    return ops.layer_norm(_rows(x), self.weight, self.bias, self.eps).view(x.shape)


def _vision_layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    """AltCLIPEncoderLayer (pre-LN) with the residual adds fused into LayerNorm / the MLP's last GEMM."""
    ops = _ops_for(self, hidden_states)
    x = _rows(hidden_states)
    ln1, ln2 = self.layer_norm1, self.layer_norm2
    attn_in = ops.layer_norm(x, ln1.weight, ln1.bias, ln1.eps).view(hidden_states.shape)
    attn_out, _ = self.self_attn(hidden_states=attn_in, attention_mask=attention_mask, **kwargs)
    mlp_in, h = ops.add_layer_norm(_rows(attn_out), x, ln2.weight, ln2.bias, ln2.eps, return_sum=True)
    if "forward" in self.mlp.__dict__:  # our MLP takes the residual into its second GEMM
        return self.mlp(mlp_in.view(hidden_states.shape), residual=h)
    return (h + _rows(self.mlp(mlp_in.view(hidden_states.shape)))).view(hidden_states.shape)


def _text_intermediate_forward(self, hidden_states):
    ops = _ops_for(self, hidden_states)
    y = ops.linear(_rows(hidden_states), self.dense.weight, self.dense.bias, activation=self._altclip_fast_act)
    return y.view(*hidden_states.shape[:-1], -1)


def _vision_mlp_forward(self, hidden_states, residual=None):
    ops = _ops_for(self, hidden_states)
    y = ops.linear(_rows(hidden_states), self.fc1.weight, self.fc1.bias, activation=self._altclip_fast_act)
    out = ops.linear(y, self.fc2.weight, self.fc2.bias, residual=None if residual is None else _rows(residual))
    return out.view(*hidden_states.shape[:-1], -1)


# --------------------------------------------------------------------------- patching


def _fuse_qkv(module, q, k, v) -> None:
    module.register_buffer(
        "_altclip_fast_qkv_weight", torch.cat([q.weight, k.weight, v.weight]).detach(), persistent=False
    )
    module.register_buffer("_altclip_fast_qkv_bias", torch.cat([q.bias, k.bias, v.bias]).detach(), persistent=False)


def _unpatch(module: nn.Module) -> None:
    for name in ("forward", "extra_repr", _BACKEND_ATTR):
        module.__dict__.pop(name, None)
    for name in ("_altclip_fast_qkv_weight", "_altclip_fast_qkv_bias"):
        module._buffers.pop(name, None)


def _patched_extra_repr(self) -> str:
    requested, _, switch = getattr(self, _BACKEND_ATTR)
    param = next(self.parameters(), None)
    backend = resolve_backend(requested, param.device if param is not None else "cpu")
    own = type(self).extra_repr(self)
    note = f"altclip_fast: {switch} patched (backend {backend})"
    return f"{own}, {note}" if own else note


def _patch(module: nn.Module, forward, setting: tuple[str, str], switch: str) -> None:
    module.forward = types.MethodType(forward, module)
    module.extra_repr = types.MethodType(_patched_extra_repr, module)
    setattr(module, _BACKEND_ATTR, (*setting, switch))


def _activation(fn) -> str | None:
    """Our name for a transformers activation module, or None (then the MLP is left alone)."""
    return {"GELUActivation": "gelu", "QuickGELUActivation": "quick_gelu"}.get(type(fn).__name__)


def optimize(hf_model: nn.Module, attention: bool = True, layer_norm: bool = True, mlp: bool = True,
             *, backend: str | None = None) -> nn.Module:
    """Patch a transformers ``AltCLIPModel``, ``AltCLIPTextModel`` or ``AltCLIPVisionModel`` in place and
    return it. ``backend``: ``None`` (``$ALTCLIP_FAST_BACKEND``, else auto: see ``altclip_fast.ops``),
    ``"auto"``, ``"torch"`` or ``"triton"``."""
    try:
        import transformers
        from transformers.models.altclip import modeling_altclip as m
    except ImportError as exc:
        raise ImportError("altclip_fast.optimize patches transformers models: pip install transformers") from exc
    if int(transformers.__version__.split(".")[0]) < 5:
        raise NotImplementedError(
            f"altclip_fast.optimize supports transformers >= 5 (found {transformers.__version__}); "
            "altclip_fast.AltCLIPModel.from_pretrained loads the same checkpoints"
        )
    if not isinstance(hf_model, (m.AltCLIPModel, m.AltCLIPTextModel, m.AltCLIPVisionModel)):
        raise TypeError(
            f"optimize expects a transformers AltCLIPModel, AltCLIPTextModel or AltCLIPVisionModel, "
            f"got {type(hf_model).__name__}"
        )
    # Read the environment and validate names now, not at the first forward.
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    resolve_backend(backend, "cpu")
    setting = (requested, gemm_mode())

    with torch.no_grad():
        for module in hf_model.modules():
            _unpatch(module)
            if attention and isinstance(module, m.AltRobertaSelfAttention):
                _fuse_qkv(module, module.query, module.key, module.value)
                _patch(module, _text_self_attention_forward, setting, "attention")
            elif attention and isinstance(module, m.AltCLIPAttention):
                _fuse_qkv(module, module.q_proj, module.k_proj, module.v_proj)
                _patch(module, _vision_attention_forward, setting, "attention")
            elif layer_norm and isinstance(module, (m.AltRobertaSelfOutput, m.AltRobertaOutput)):
                _patch(module, _dense_add_norm_forward, setting, "layer_norm")
            elif layer_norm and isinstance(module, m.AltCLIPEncoderLayer):
                _patch(module, _vision_layer_forward, setting, "layer_norm")
            elif layer_norm and isinstance(module, nn.LayerNorm):
                _patch(module, _layer_norm_forward, setting, "layer_norm")
            elif mlp and isinstance(module, m.AltRobertaIntermediate) and _activation(module.intermediate_act_fn):
                module._altclip_fast_act = _activation(module.intermediate_act_fn)
                _patch(module, _text_intermediate_forward, setting, "mlp")
            elif mlp and isinstance(module, m.AltCLIPMLP) and _activation(module.activation_fn):
                module._altclip_fast_act = _activation(module.activation_fn)
                _patch(module, _vision_mlp_forward, setting, "mlp")
    return hf_model


class _CallableModule(types.ModuleType):
    """``import altclip_fast.optimize`` makes the package attribute ``altclip_fast.optimize`` this module
    (Python sets it after the import), shadowing the function of the same name: keep both callable."""

    def __call__(self, *args, **kwargs):
        return optimize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
