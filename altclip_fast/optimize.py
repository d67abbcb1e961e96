"""``optimize(hf_model)``: speed up an already-loaded transformers AltCLIP model in place.

For users who keep transformers' model object (its processor pipeline, its outputs, its
``save_pretrained``), in the way Liger-Kernel patches LLMs: the modules stay where they are, their
``forward`` is replaced on the instance by one that runs the same math through ``altclip_fast.ops``
(Triton kernels on CUDA, oneDNN-fused torch ops on CPU). A patched module says so in its ``repr``.
One switch per kernel:

- ``attention``: one fused QKV GEMM per layer and the attention kernel (FlashAttention-style on CUDA,
  ``F.scaled_dot_product_attention`` on CPU).
- ``layer_norm``: residual add + LayerNorm fused (and, in the text tower, the dense bias too).
- ``mlp``: linear + bias + GELU / quick_gelu fused, and the vision MLP's residual add.

Calling it again with other switches applies exactly the new set (``False`` removes a patch).
Requests for attention weights (``output_attentions=True``, or the ``eager`` implementation) run
transformers' own attention. Supports transformers >= 5 (the versions whose module signatures this
code follows); older versions get a clear error.

The patch is for inference and never changes training behaviour. A patched module runs transformers'
original ``forward`` (the very same code, so the results are exact) whenever

- autograd records: grad mode is on and one of the module's parameters or tensor inputs requires
  grad (run under ``torch.inference_mode()`` / ``torch.no_grad()``, or ``requires_grad_(False)`` the
  model, to get the fast path), or
- the module is in training mode with a nonzero dropout rate.

The fast path therefore never records a graph, so its in-place epilogues touch no tensor autograd
needs.

Weights are read as they are at each call: patch before loading, on the meta device inside
``from_pretrained``, or after loading, and ``load_state_dict``, ``init_weights``, optimizer steps and
``.to()`` are all seen. The one derived copy, each layer's concatenated QKV weight and bias (not a
buffer: ``state_dict``, ``named_buffers`` and ``.to()`` never see it), is rebuilt when any of its
sources is no longer the same tensor or changed: each call compares their autograd version counters,
storage pointers, dtypes, devices and shapes. Changes made through ``param.data`` bypass the version
counter; call ``optimize`` again after those.

The backend request (``backend=``, else ``$ALTCLIP_FAST_BACKEND``) and the GEMM mode
(``$ALTCLIP_FAST_GEMM``) are read by ``optimize``; each forward maps them to its input's device.
Nothing is folded or pre-blocked for oneDNN.
"""

from __future__ import annotations

import sys
import types
import weakref

import torch
from torch import nn

from . import environment
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


def _records_autograd(module: nn.Module, args, kwargs) -> bool:
    """Would transformers' forward record a graph here? Grad mode on, and a tensor input or one of the
    module's parameters requires grad. Parameters are looked up per call: loading may replace them."""
    if not torch.is_grad_enabled():
        return False
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return True
    return any(p.requires_grad for p in module.parameters())


def _dropout_active(module: nn.Module) -> bool:
    """Training mode with a nonzero dropout rate anywhere in the module. transformers keeps attention
    dropout rates as floats (``dropout`` / ``attention_dropout``) as well as ``nn.Dropout`` modules."""
    if not module.training:
        return False
    for sub in module.modules():
        if isinstance(sub, nn.Dropout) and sub.p > 0:
            return True
        for name in ("dropout", "attention_dropout"):
            rate = sub.__dict__.get(name)
            if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
                return True
    return False


def _must_fall_back(module: nn.Module, args, kwargs) -> bool:
    return _dropout_active(module) or _records_autograd(module, args, kwargs)


# --------------------------------------------------------------------------- patched forwards


def _fused_attention(self, ops, hidden_states, attention_mask, num_heads, scale):
    """Fused QKV projection + attention over a padded batch: the context rows ``[tokens, hidden]``."""
    batch, seqlen, _ = hidden_states.shape
    layout = PaddedLayout(batch, seqlen, _key_padding_mask(attention_mask, batch, seqlen))
    weight, bias = _qkv(self)
    qkv = ops.linear(_rows(hidden_states), weight, bias)
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
    if "forward" in self.mlp.__dict__:
        # Our MLP takes the residual into its second GEMM. Its fast path is implied by this layer's:
        # it holds a subset of the layer's parameters, its input comes from the fast path, no dropout.
        return _vision_mlp_forward(self.mlp, mlp_in.view(hidden_states.shape), residual=h)
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


_QKV = "_altclip_fast_qkv"  # instance attribute: the _QKVCache of an attention module


def _stamp(t: torch.Tensor | None):
    """What identifies a tensor's current values without reading them: any in-place change bumps the
    version counter; ``.to()`` and ``param.data = ...`` move the storage. Inference tensors have no
    version counter (None: never trusted)."""
    if t is None:
        return None
    return (None if t.is_inference() else t._version, t.data_ptr(), t.dtype, t.device, t.shape)


class _QKVCache:
    """The fused QKV weight and bias of one attention module, and the stamps of the tensors they were
    built from. Copies and pickles start empty: they would describe another model's tensors."""

    __slots__ = ("refs", "stamps", "weight", "bias")

    def __init__(self):
        self.refs = self.stamps = self.weight = self.bias = None

    def __reduce__(self):
        return (_QKVCache, ())

    def __deepcopy__(self, memo):
        return _QKVCache()

    def fresh(self, sources) -> bool:
        if self.refs is None:
            return False
        for ref, stamp, t in zip(self.refs, self.stamps, sources):
            if (None if ref is None else ref()) is not t or stamp != _stamp(t) or (stamp is not None and stamp[0] is None):
                return False
        return True


def _qkv(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The module's Q, K and V projections as one ``[3 * hidden, hidden]`` weight (and bias), from the
    weights as they are now: rebuilt when a source changed, else the cached copy."""
    projections = module._altclip_fast_qkv_sources
    sources = [getattr(module, name).weight for name in projections]
    sources += [getattr(module, name).bias for name in projections]
    cache = module.__dict__.get(_QKV)
    if cache is None:
        cache = module.__dict__[_QKV] = _QKVCache()
    if not cache.fresh(sources):
        with torch.no_grad():
            weights, biases = sources[:3], sources[3:]
            cache.weight = torch.cat(weights)
            cache.bias = None if any(b is None for b in biases) else torch.cat(biases)
        cache.refs = [None if t is None else weakref.ref(t) for t in sources]
        cache.stamps = [_stamp(t) for t in sources]
    return cache.weight, cache.bias


def _unpatch(module: nn.Module) -> None:
    for name in ("forward", "extra_repr", _BACKEND_ATTR, _QKV, "_altclip_fast_qkv_sources", "_altclip_fast_act"):
        module.__dict__.pop(name, None)


def _patched_extra_repr(self) -> str:
    requested, _, switch = getattr(self, _BACKEND_ATTR)
    param = next(self.parameters(), None)
    backend = resolve_backend(requested, param.device if param is not None else "cpu")
    own = type(self).extra_repr(self)
    note = f"altclip_fast: {switch} patched (backend {backend})"
    return f"{own}, {note}" if own else note


def _guarded(fast):
    """``fast`` as a module forward that hands over to transformers' own forward whenever autograd
    records or dropout is live (see the module docstring)."""

    def forward(self, *args, **kwargs):
        if _must_fall_back(self, args, kwargs):
            return type(self).forward(self, *args, **kwargs)
        return fast(self, *args, **kwargs)

    forward.__name__ = forward.__qualname__ = fast.__name__
    forward.__doc__ = fast.__doc__
    return forward


def _patch(module: nn.Module, forward, setting: tuple[str, str], switch: str) -> None:
    module.forward = types.MethodType(_guarded(forward), module)
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
    requested = backend if backend is not None else environment.get(ENV_VAR)
    resolve_backend(backend, "cpu")
    setting = (requested, gemm_mode())

    for module in hf_model.modules():
        _unpatch(module)
        if attention and isinstance(module, m.AltRobertaSelfAttention):
            module._altclip_fast_qkv_sources = ("query", "key", "value")
            _patch(module, _text_self_attention_forward, setting, "attention")
        elif attention and isinstance(module, m.AltCLIPAttention):
            module._altclip_fast_qkv_sources = ("q_proj", "k_proj", "v_proj")
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
