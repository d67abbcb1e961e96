"""Key maps between the fast model's parameters and checkpoint keys, in both directions.

A key map sends each fast parameter name to the checkpoint keys it is built from, in the canonical
layout (transformers 4.38's, see ``checkpoint.canonicalize_keys``). Most parameters have one source;
a fused QKV has three (query, key, value), concatenated along dim 0. Loading goes one way, saving
the other (``split_state_dict``), from the same map, so the two cannot drift apart. The model's loader
fills each parameter from the file in place, following the map (``model._load_fused``: no fused copy
is built beside the sources); ``fuse_state_dict`` is the same step on tensors already in memory.

Pure functions on names, shapes and tensors: no modules, no files.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import AltCLIPConfig, AltCLIPTextConfig, AltCLIPVisionConfig

__all__ = [
    "KeyMap",
    "text_key_map",
    "vision_key_map",
    "model_key_map",
    "prefixed",
    "checkpoint_shapes_for",
    "fuse_state_dict",
    "split_state_dict",
]

# fast parameter name -> the checkpoint keys it is built from (several: concatenated along dim 0)
KeyMap = dict[str, tuple[str, ...]]


def _linear(fast: str, canonical: str, bias: bool = True) -> KeyMap:
    out = {f"{fast}.weight": (f"{canonical}.weight",)}
    if bias:
        out[f"{fast}.bias"] = (f"{canonical}.bias",)
    return out


def _fused_qkv(fast: str, q: str, k: str, v: str) -> KeyMap:
    return {f"{fast}.{p}": (f"{q}.{p}", f"{k}.{p}", f"{v}.{p}") for p in ("weight", "bias")}


def _encoder_layer(dst: str, *, qkv: tuple[str, str, str], out: str, norm1: str, fc1: str, fc2: str,
                   norm2: str) -> KeyMap:
    """One ``EncoderLayer``'s map: both towers' layers are the same module under different source names."""
    return {
        **_fused_qkv(f"{dst}.qkv", *qkv),
        **_linear(f"{dst}.out", out),
        **_linear(f"{dst}.norm1", norm1),
        **_linear(f"{dst}.fc1", fc1),
        **_linear(f"{dst}.fc2", fc2),
        **_linear(f"{dst}.norm2", norm2),
    }


def text_key_map(config: AltCLIPTextConfig, *, layer: str = "layer") -> KeyMap:
    """The text tower's map, keys relative to the tower (``roberta.*``, ``pre_LN.*``, ...).

    ``layer``: the name of the encoder's layer list, ``"layer"`` in the canonical layout. transformers 5's
    standalone ``AltCLIPTextModel`` reads ``"layers"`` only: its renaming of old files is registered
    for the full model alone.
    """
    emb = "roberta.embeddings"
    m = {
        "word_embeddings.weight": (f"{emb}.word_embeddings.weight",),
        "position_embeddings.weight": (f"{emb}.position_embeddings.weight",),
        "token_type_embeddings.weight": (f"{emb}.token_type_embeddings.weight",),
        **_linear("embeddings_norm", f"{emb}.LayerNorm"),
    }
    for i in range(config.num_hidden_layers):
        src = f"roberta.encoder.{layer}.{i}"
        att = f"{src}.attention"
        m.update(_encoder_layer(
            f"layers.{i}", qkv=(f"{att}.self.query", f"{att}.self.key", f"{att}.self.value"),
            out=f"{att}.output.dense", norm1=f"{att}.output.LayerNorm", fc1=f"{src}.intermediate.dense",
            fc2=f"{src}.output.dense", norm2=f"{src}.output.LayerNorm",
        ))
    m.update(_linear("final_norm", "pre_LN"))
    m.update(_linear("transformation", "transformation"))
    return m


def vision_key_map(config: AltCLIPVisionConfig) -> KeyMap:
    """The vision tower's map, keys relative to ``vision_model.`` (``embeddings.*``, ``encoder.*``, ...)."""
    m = {
        "class_embedding": ("embeddings.class_embedding",),
        "patch_embedding": ("embeddings.patch_embedding.weight",),
        "position_embedding": ("embeddings.position_embedding.weight",),
        **_linear("pre_norm", "pre_layrnorm"),
    }
    for i in range(config.num_hidden_layers):
        src = f"encoder.layers.{i}"
        att = f"{src}.self_attn"
        m.update(_encoder_layer(
            f"layers.{i}", qkv=(f"{att}.q_proj", f"{att}.k_proj", f"{att}.v_proj"), out=f"{att}.out_proj",
            norm1=f"{src}.layer_norm1", fc1=f"{src}.mlp.fc1", fc2=f"{src}.mlp.fc2", norm2=f"{src}.layer_norm2",
        ))
    m.update(_linear("post_norm", "post_layernorm"))
    return m


def prefixed(key_map: Mapping[str, tuple[str, ...]], fast: str, canonical: str) -> KeyMap:
    """``key_map`` with ``fast`` prepended to every parameter name and ``canonical`` to every key."""
    return {fast + k: tuple(canonical + s for s in v) for k, v in key_map.items()}


def model_key_map(config: AltCLIPConfig) -> KeyMap:
    """The full model's map: both towers under their prefixes, the projections and the temperature."""
    return {
        **prefixed(text_key_map(config.text_config), "text_model.", "text_model."),
        **prefixed(vision_key_map(config.vision_config), "vision_model.", "vision_model."),
        "text_projection.weight": ("text_projection.weight",),
        "visual_projection.weight": ("visual_projection.weight",),
        "logit_scale": ("logit_scale",),
    }


def _check_names(key_map: Mapping[str, tuple[str, ...]], names, what: str) -> None:
    if set(names) != set(key_map):
        # A programming error, not a checkpoint problem: every parameter must have a source.
        raise AssertionError(f"key map and {what} disagree: {sorted(set(names) ^ set(key_map))}")


def checkpoint_shapes_for(
    key_map: Mapping[str, tuple[str, ...]], param_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, from the fast parameters' shapes (fused ones split evenly along dim 0)."""
    _check_names(key_map, param_shapes, "parameters")
    shapes = {}
    for name, sources in key_map.items():
        shape = tuple(param_shapes[name])
        part = (shape[0] // len(sources), *shape[1:]) if len(sources) > 1 else shape
        shapes.update({s: part for s in sources})
    return shapes


def fuse_state_dict(
    key_map: Mapping[str, tuple[str, ...]], state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Canonical checkpoint tensors -> fast parameter tensors. The caller checks keys and shapes first
    (``checkpoint.check_state_dict`` against ``checkpoint_shapes_for``)."""
    fast = {}
    for name, sources in key_map.items():
        parts = [state_dict[s] for s in sources]
        fast[name] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    return fast


def split_state_dict(
    key_map: Mapping[str, tuple[str, ...]], fast_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Fast parameter tensors -> canonical checkpoint tensors: the inverse of ``fuse_state_dict``.
    The parts of a fused tensor are copies, not views: safetensors refuses tensors sharing storage."""
    _check_names(key_map, fast_state, "state dict")
    out = {}
    for name, sources in key_map.items():
        tensor = fast_state[name]
        if len(sources) == 1:
            out[sources[0]] = tensor
            continue
        if tensor.shape[0] % len(sources):
            raise ValueError(f"{name} {tuple(tensor.shape)}: dim 0 does not split into {len(sources)} equal parts")
        out.update(zip(sources, (part.clone() for part in tensor.chunk(len(sources), 0))))
    return out
