"""The fast AltCLIP: a drop-in for the reference (and transformers') AltCLIPModel, AltCLIPTextModel and
AltCLIPVisionModel.

What makes it fast, all invisible in the outputs:

- Weights are re-laid out once at load: one QKV matrix per layer. Conversion to the model's dtype
  happens once, there too.
- Every op goes through one op set (``altclip_fast.ops``), resolved once per model: Triton kernels on
  CUDA, the fastest torch path on CPU. Its prepare step derives the forms of the weights it runs
  fastest (see ``AltCLIPModel``); the parameters keep the checkpoint's values.
- Text runs unpadded: pad tokens are dropped before the embeddings, real tokens are packed, and
  attention is varlen over ``cu_seqlens``. Position ids are computed on the padded grid exactly as
  RoBERTa does, so a text's embedding does not depend on its batch.
- ``get_text_features`` / ``get_image_features`` need only the pooled token (token 0), so the last
  layer computes its query, attention, output projection and MLP, and everything after it, for that
  token alone (keys and values still come from every token).

Where it differs from transformers (documented, deliberate):

- Pad positions of a text tower's per-token outputs (``last_hidden_state``, ``hidden_states``) are
  zeros: they were never computed. transformers fills them with values no one should read.
  With ``output_attentions=True`` the text tower runs padded, as transformers does, and those
  positions match it too.
- ``output_attentions=True`` needs every attention probability, so it uses explicit attention
  (an ``[batch, heads, seq, seq]`` tensor per layer, at matmul speed, no fused kernel): expect the
  attention part to run several times slower and to use that much more memory.
- ``get_text_features`` / ``get_image_features`` return tensors (the reference's and transformers 4's
  API), not transformers 5's output objects, unless a keyword asks for more (``output_hidden_states``,
  ``output_attentions``, ``return_dict``): then the output object, with the embeddings as ``pooler_output``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import resolve_dtype
from .checkpoint import check_state_dict, copy_into, float_dtype, load_into, rekey, release, tensor_spec
from .lazy_tensors import LazyStateDict
from .compat import InferenceAPI, check_call_kwargs, check_save_kwargs, device_arg, dtype_arg, read_pretrained, with_loading_info
from .config import AltCLIPConfig, AltCLIPTextConfig, AltCLIPVisionConfig
from ..ops import PackedLayout, PaddedLayout, get_ops, resolve_backend
from .layers import EncoderLayer, derived_nbytes
from .weights import (
    checkpoint_shapes_for, model_key_map, prefixed, split_state_dict, text_key_map, vision_key_map,
)
from .outputs import AltCLIPOutput, BaseModelOutputWithPooling, BaseModelOutputWithPoolingAndProjection

__all__ = [
    "AltCLIPModel", "AltCLIPTextModel", "AltCLIPVisionModel", "checkpoint_shapes", "clip_loss", "roberta_position_ids",
]


def _param_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def checkpoint_shapes(config: AltCLIPConfig) -> dict[str, tuple[int, ...]]:
    """Every key (canonical layout) of a checkpoint for ``config``, with its shape."""
    with torch.device("meta"):
        model = AltCLIPModel(config)
    return checkpoint_shapes_for(model_key_map(config), _param_shapes(model))


def _check_device(device) -> None:
    """A CUDA device on a machine without one is a clear error, not torch's bare AssertionError from
    deep inside the first copy to it."""
    if device is None or torch.device(device).type != "cuda" or torch.cuda.is_available():
        return
    from ..errors import AltCLIPError

    why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
    raise AltCLIPError(f"device={str(device)!r}: CUDA is not available on this machine ({why}); use device='cpu'")


def _load_fused(module: nn.Module, mapping, state_dict, *, dtype, device, source: str) -> None:
    """Check ``state_dict`` (canonical keys) against what ``module`` needs, build the fused tensors, and
    assign them. Every checkpoint key is consumed and every parameter filled, or CheckpointError.

    Each parameter is allocated once, in ``dtype`` on ``device``, and its checkpoint tensors are
    converted into it one at a time (a lazy state dict a slice at a time): no second copy of the model,
    in the checkpoint's dtype or as separate query, key and value, is ever held."""
    _check_device(device)
    check_state_dict(checkpoint_shapes_for(mapping, _param_shapes(module)), state_dict, source)
    fast = {name: _gather(state_dict, sources, dtype, device) for name, sources in mapping.items()}
    owners = [m for m in module.modules() if isinstance(m, (_Tower, AltCLIPModel))]
    for m in owners:  # load_state_dict's post-hook would prepare from the converted parameters
        m._defer_prepare = True
    try:
        load_into(module, fast, dtype=dtype, device=device, source=source)
    finally:
        for m in owners:
            m._defer_prepare = False
    del fast
    # Derive from the checkpoint's own tensors: a fold is then rounded once, as plain weights are.
    params = dict(module.named_parameters())
    module.prepare(sources=_CheckpointSources({id(params[name]): keys for name, keys in mapping.items()}, state_dict))
    release(state_dict)


def _gather(state_dict, sources: tuple[str, ...], dtype, device) -> torch.Tensor:
    """The parameter built from checkpoint keys ``sources`` (several: concatenated along dim 0),
    converted to ``dtype`` (floating point only) on ``device``."""
    stored, shape = tensor_spec(state_dict, sources[0])
    target = dtype if stored.is_floating_point else stored
    if len(sources) == 1 and not isinstance(state_dict, LazyStateDict):
        return state_dict[sources[0]].to(device=device, dtype=target)  # no copy when nothing changes
    shapes = [tensor_spec(state_dict, s)[1] for s in sources]
    rows = [s[0] for s in shapes] if len(sources) > 1 else None
    out = torch.empty((sum(rows), *shape[1:]) if rows else shape, dtype=target, device=device)
    start = 0
    for key, n in zip(sources, rows or [None]):
        copy_into(state_dict, key, out if n is None else out[start:start + n])
        start += n or 0
    return out


class _CheckpointSources(Mapping):
    """parameter -> the checkpoint tensor it was loaded from, read only when the prepare step asks
    (a fold reads its layer's two MLP weights, one layer at a time)."""

    def __init__(self, keys_by_param: dict[int, tuple[str, ...]], state_dict):
        self._keys, self._state = keys_by_param, state_dict

    def __getitem__(self, param: torch.Tensor) -> torch.Tensor:
        keys = self._keys[id(param)]
        parts = [self._state[k] for k in keys]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __contains__(self, param) -> bool:
        return id(param) in self._keys

    def __iter__(self):
        raise TypeError("checkpoint sources are looked up by parameter, not iterated")

    def __len__(self) -> int:
        return len(self._keys)


def _prepare_after_load(module, incompatible_keys) -> None:
    """load_state_dict post-hook: new parameter values need new derived forms."""
    if not module._defer_prepare:
        module.prepare()


def _load_pretrained(cls, part: str, key_map_fn, path_or_id, *, backend, strip: str = "", **options):
    """A tower's ``from_pretrained``; ``options``: dtype, torch_dtype, device, device_map and transformers'
    other keywords, each honoured or refused by name (``compat.read_pretrained``)."""
    ckpt, dtype, device, loading_info = read_pretrained(
        path_or_id, part, dtype=options.pop("dtype"), torch_dtype=options.pop("torch_dtype"),
        device=options.pop("device"), device_map=options.pop("device_map"), kwargs=options,
    )
    state = rekey(ckpt.state_dict, lambda k: k[len(strip):] if strip and k.startswith(strip) else k)
    with torch.device("meta"):
        model = cls(ckpt.config, backend=backend)
    _load_fused(model, key_map_fn(ckpt.config), state, dtype=resolve_dtype(dtype), device=device, source=ckpt.source)
    return with_loading_info(model.eval(), loading_info)


def _save_pretrained(module: nn.Module, key_map, config: dict, architecture: str, save_directory) -> None:
    """Write ``config.json`` and ``model.safetensors`` (keys from ``key_map``, the model's dtype) so that
    transformers' ``from_pretrained`` and ours both read the directory."""
    from safetensors.torch import save_file

    path = Path(save_directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"save_pretrained: {path} exists and is not a directory")
    # Parameters hold the checkpoint's values (the backend's derived forms live outside state_dict).
    state = split_state_dict(key_map, {name: p.detach() for name, p in module.named_parameters()})
    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}
    config = {**config, "architectures": [architecture], "dtype": str(module.dtype).removeprefix("torch.")}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def interpolate_positions(table: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A ``[1 + n*n, hidden]`` position table (class position first, then an ``n x n`` patch grid)
    resized to a ``rows x cols`` grid as transformers' CLIP ``interpolate_pos_encoding`` does it:
    bicubic, ``align_corners=False``, in the table's dtype; the class position is kept."""
    dim, grid = table.shape[-1], round((table.shape[0] - 1) ** 0.5)
    patch = table[1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(rows, cols), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], patch.permute(0, 2, 3, 1).reshape(rows * cols, dim)]).contiguous()


def roberta_position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa (fairseq ``make_positions``) position ids: real tokens count from ``padding_idx + 1`` in
    row order, pads keep ``padding_idx``. Defined on the padded grid, so packing cannot change them."""
    real = input_ids.ne(padding_idx).long()
    return torch.cumsum(real, dim=1) * real + padding_idx


def _patch_rows(pixels: torch.Tensor, p: int, rows: int, cols: int, width: int) -> torch.Tensor:
    """``[batch * rows * cols, width]``: each ``p x p`` patch flattened in the conv weight's (channel, row,
    col) order, in one copy. Past ``channels * p * p`` the columns are zeros, for a backend that padded
    the weight's in-features (``Ops.prepare_weight``). A conv with stride = kernel ignores the pixels past
    the last whole patch, and so does this."""
    batch, channels = pixels.shape[:2]
    k = channels * p * p
    grid = pixels[:, :, : rows * p, : cols * p].reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
    if width == k:
        return grid.reshape(batch * rows * cols, k)  # no -1: an empty batch has no size to infer
    out = pixels.new_empty(batch * rows * cols, width)
    out[:, k:].zero_()
    out[:, :k].view(batch, rows, cols, channels, p, p).copy_(grid)
    return out


def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss: text i matches image i, averaged over both directions."""
    targets = torch.arange(len(logits_per_text), device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.t(), targets)) / 2


class _Tower(InferenceAPI, nn.Module):
    """What both towers share: dtype/device/backend bookkeeping, the prepare step, loading.

    ``ops`` is the op set resolved for the tower's device and ``backend``; ``prepare`` resolves it and
    derives the backend's forms of the weights. It runs by itself when the tower is built, loaded
    (``from_pretrained``, ``load_state_dict``), moved or converted (``.to()``, ``.half()`` ...) and when
    ``backend`` is set; call it yourself after changing parameters in place.
    """

    def __init__(self):
        super().__init__()
        self._backend = None
        self.ops = None
        self._prepared: dict[str, torch.Tensor] = {}  # derived forms of the tower's own GEMM weights
        self._defer_prepare = False
        self.register_load_state_dict_post_hook(_prepare_after_load)

    @property
    def backend(self) -> str | None:
        """``None`` (auto: ``$ALTCLIP_FAST_BACKEND``, else Triton on CUDA and torch on CPU), ``"auto"``,
        ``"torch"`` or ``"triton"``. Setting it re-resolves the op set and re-prepares the weights."""
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        if value is not None:
            resolve_backend(value, "cpu")  # a bad name fails here, not at the first forward
        self._backend = value
        if "layers" in self._modules:
            self.prepare()

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].qkv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].qkv.weight.device

    def _own_weights(self) -> dict[str, torch.Tensor]:
        """The tower's GEMM weights outside its layers, as ``ops.linear`` takes them."""
        raise NotImplementedError

    @torch.no_grad()
    def prepare(self, sources=None) -> None:
        """Resolve the backend for the current device (``$ALTCLIP_FAST_BACKEND`` and
        ``$ALTCLIP_FAST_GEMM`` are read now) and derive the backend's forms of the weights.
        ``sources``: parameter -> the checkpoint tensor it was loaded from (see ``EncoderLayer.prepare``)."""
        device = self.device
        self.ops = get_ops(resolve_backend(self._backend, device))
        ops = None if device.type == "meta" else self.ops
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer.prepare(ops, sources, query_rows=i == last)
        self._prepared = {} if ops is None else {k: ops.prepare_weight(w) for k, w in self._own_weights().items()}

    def _weight(self, name: str) -> torch.Tensor:
        hit = self._prepared.get(name)
        return hit if hit is not None else self._own_weights()[name]

    def derived_nbytes(self) -> int:
        """Bytes held by the backend's derived copies of this tower's weights (see ``AltCLIPModel``)."""
        own = derived_nbytes(self._prepared.values(), self.parameters())
        return own + sum(layer.derived_nbytes() for layer in self.layers)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.prepare()  # new device or dtype: maybe another backend, certainly new derived forms
        return out

    def _run_layers(self, x, layout, ops, *, keep_rows, output_attentions, output_hidden_states, to_grid):
        hidden_states = [to_grid(x)] if output_hidden_states else None
        attentions = [] if output_attentions else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, probs = layer(
                x, layout, ops, keep_rows=keep_rows if i == last else None, output_attentions=output_attentions
            )
            if output_hidden_states:
                hidden_states.append(to_grid(x))
            if output_attentions:
                attentions.append(probs)
        return x, (tuple(hidden_states) if output_hidden_states else None), (
            tuple(attentions) if output_attentions else None
        )


class AltCLIPTextModel(_Tower):
    """XLM-R text tower: embeddings, post-LN encoder, ``pre_LN`` (a LayerNorm *after* the encoder)
    and ``transformation``; the pooled output is token 0 of the projected states."""

    def __init__(self, config: AltCLIPTextConfig, *, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.config = config
        self.backend = backend
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, **kw)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h, **kw)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h, **kw)
        self.embeddings_norm = nn.LayerNorm(h, eps=config.layer_norm_eps, **kw)
        self.layers = nn.ModuleList(
            EncoderLayer(
                h, config.num_attention_heads, config.intermediate_size, eps=config.layer_norm_eps,
                activation=config.hidden_act, pre_norm=False, **kw,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.final_norm = nn.LayerNorm(h, eps=config.layer_norm_eps, **kw)
        self.transformation = nn.Linear(h, config.project_dim, **kw)
        self.prepare()

    def _own_weights(self) -> dict[str, torch.Tensor]:
        return {"transformation.weight": self.transformation.weight}

    main_input_name = "input_ids"
    base_model_prefix = "roberta"

    @classmethod
    def from_pretrained(cls, path_or_id, dtype=None, device=None, backend: str | None = None, *, torch_dtype=None,
                        device_map=None, **kwargs):
        """Load the text tower of an AltCLIP checkpoint directory (or hub id), or a text-tower-only one.
        transformers' keywords: see :meth:`AltCLIPModel.from_pretrained`."""
        return _load_pretrained(
            cls, "text", text_key_map, path_or_id, dtype=dtype, torch_dtype=torch_dtype, device=device,
            device_map=device_map, backend=backend, **kwargs,
        )

    def get_input_embeddings(self) -> nn.Embedding:
        """The word embeddings, as transformers' ``AltCLIPTextModel`` returns them."""
        return self.word_embeddings

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write a standalone text-tower checkpoint that transformers 5's ``AltCLIPTextModel`` and
        :meth:`from_pretrained` both load."""
        check_save_kwargs(kwargs)
        key_map = text_key_map(self.config, layer="layers")
        _save_pretrained(self, key_map, self.config.to_dict(), "AltCLIPTextModel", save_directory)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        check_call_kwargs("AltCLIPTextModel.forward", kwargs)
        out = self.encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
            output_attentions=bool(output_attentions), output_hidden_states=bool(output_hidden_states),
        )
        return out.to_tuple() if return_dict is False else out

    def _check_inputs(self, input_ids, attention_mask, inputs_embeds, *, pooled_only, output_attentions,
                      output_hidden_states):
        """Validate the inputs and move them to the model: ``(input_ids, inputs_embeds, keep)``, ``keep``
        the attention mask as bools (or None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids and inputs_embeds")
        if pooled_only and (output_attentions or output_hidden_states):
            raise ValueError("pooled_only computes no per-layer outputs")
        device = self.device
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.is_floating_point():
                raise ValueError(f"input_ids must be an integer [batch, seq] tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
            input_ids = input_ids.to(device)
            batch, seqlen = input_ids.shape
        else:
            if inputs_embeds.dim() != 3:
                raise ValueError(f"inputs_embeds must be [batch, seq, hidden], got {tuple(inputs_embeds.shape)}")
            inputs_embeds = inputs_embeds.to(device=device, dtype=self.dtype)
            batch, seqlen = inputs_embeds.shape[:2]
        if seqlen > self.config.max_text_length:
            raise ValueError(
                f"sequence length {seqlen} exceeds the model's maximum of {self.config.max_text_length} tokens "
                f"(max_position_embeddings {self.config.max_position_embeddings}, positions start at pad_token_id + 1)"
            )
        keep = attention_mask.to(device).bool() if attention_mask is not None else None
        if keep is not None and keep.shape != (batch, seqlen):
            raise ValueError(f"attention_mask must be {(batch, seqlen)}, got {tuple(keep.shape)}")
        return input_ids, inputs_embeds, keep

    def _position_ids(self, input_ids, position_ids, batch, seqlen, device):
        pad = self.config.pad_token_id
        if position_ids is not None:
            return position_ids.to(device).expand(batch, seqlen)
        if input_ids is not None:
            return roberta_position_ids(input_ids, pad)
        return torch.arange(pad + 1, seqlen + pad + 1, device=device).expand(batch, seqlen)

    def _embed(self, grid: "_TextGrid", ops, input_ids, inputs_embeds, token_type_ids, pos):
        """Word (or given), token type and position embeddings and their LayerNorm, for the computed rows."""
        if inputs_embeds is not None:
            x = grid.select(inputs_embeds)
        else:
            x = F.embedding(grid.select(input_ids), self.word_embeddings.weight)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # the all-zeros default, without a gather
        else:
            types = token_type_ids.to(x.device).expand(grid.batch, grid.seqlen)
            x = x + F.embedding(grid.select(types), self.token_type_embeddings.weight)
        x = x + F.embedding(grid.select(pos), self.position_embeddings.weight)
        return ops.layer_norm(x, self.embeddings_norm.weight, self.embeddings_norm.bias, self.config.layer_norm_eps)

    def _head(self, x, ops):
        """``pre_LN`` then ``transformation``, on every row given."""
        x = ops.layer_norm(x, self.final_norm.weight, self.final_norm.bias, self.config.layer_norm_eps)
        return ops.linear(x, self._weight("transformation.weight"), self.transformation.bias)

    def encode(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        pooled_only: bool = False,
    ):
        """The tower's forward. With ``pooled_only`` it returns just the pooled ``[batch, project_dim]``
        tensor, computing the last layer and the projection for token 0 alone."""
        input_ids, inputs_embeds, keep = self._check_inputs(
            input_ids, attention_mask, inputs_embeds, pooled_only=pooled_only,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )
        batch, seqlen = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device, ops = self.device, self.ops
        pos = self._position_ids(input_ids, position_ids, batch, seqlen, device)
        grid = _TextGrid.choose(keep, batch, seqlen, output_attentions=output_attentions)
        x = self._embed(grid, ops, input_ids, inputs_embeds, token_type_ids, pos)
        pooled_rows = grid.pooled_rows(device)
        x, hidden_states, attentions = self._run_layers(
            x, grid.layout, ops, keep_rows=pooled_rows if pooled_only else None,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, to_grid=grid.to_grid,
        )
        projected = self._head(x, ops)
        if pooled_only:
            return projected
        return BaseModelOutputWithPoolingAndProjection(
            last_hidden_state=grid.to_grid(projected),
            pooler_output=projected.index_select(0, pooled_rows),
            hidden_states=hidden_states,
            attentions=attentions,
        )


class _TextGrid(NamedTuple):
    """Which cells of the ``[batch, seqlen]`` token grid the text layers compute, as rows: every cell
    (padded layout) or the real tokens only (packed layout)."""

    batch: int
    seqlen: int
    layout: PaddedLayout | PackedLayout
    rows: torch.Tensor | None  # flattened grid index of each computed row; None: every cell, in order

    @classmethod
    def choose(cls, keep: torch.Tensor | None, batch: int, seqlen: int, *, output_attentions: bool) -> "_TextGrid":
        # Pack only when it is exact: the pooled token 0 must itself be a real token in every row.
        # (Left padding or an empty row falls back to the padded computation.) Attention maps are
        # [batch, heads, seq, seq], so they need the padded grid too.
        if keep is None or bool(keep.all()):
            return cls(batch, seqlen, PaddedLayout(batch, seqlen, None), None)
        if not output_attentions and bool(keep[:, 0].all()):
            layout = PackedLayout.from_mask(keep)
            return cls(batch, seqlen, layout, layout.grid_index)
        return cls(batch, seqlen, PaddedLayout(batch, seqlen, keep), None)

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """``[batch, seqlen, ...]`` -> the computed rows ``[rows, ...]``."""
        t = t.reshape(self.batch * self.seqlen, *t.shape[2:])
        return t if self.rows is None else t.index_select(0, self.rows)

    def to_grid(self, t: torch.Tensor) -> torch.Tensor:
        """Computed rows -> ``[batch, seqlen, features]``, zeros where nothing was computed."""
        if self.rows is None:
            return t.view(self.batch, self.seqlen, -1)
        grid = t.new_zeros((self.batch * self.seqlen, t.shape[-1]))
        return grid.index_copy_(0, self.rows, t).view(self.batch, self.seqlen, -1)

    def pooled_rows(self, device) -> torch.Tensor:
        """The row of each sequence's token 0."""
        if isinstance(self.layout, PackedLayout):
            return self.layout.cu_seqlens[:-1].long()
        return torch.arange(self.batch, device=device) * self.seqlen


class AltCLIPVisionModel(_Tower):
    """CLIP ViT vision tower: patch embedding, class and position embeddings, ``pre_layrnorm``,
    pre-LN encoder with quick_gelu, ``post_layernorm`` on the class token (the pooled output)."""

    def __init__(self, config: AltCLIPVisionConfig, *, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.config = config
        # (height, width, dtype, device) -> position table resized for that image size. A plain dict,
        # not a buffer: it is derived, like the backend's prepared weights, and never saved.
        self._position_cache: dict[tuple, torch.Tensor] = {}
        self.backend = backend
        h, c, p = config.hidden_size, config.num_channels, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(h, **kw))
        # The patch convolution (stride = kernel, no bias) runs as a GEMM over flattened patches.
        self.patch_embedding = nn.Parameter(torch.empty(h, c, p, p, **kw))
        self.position_embedding = nn.Parameter(torch.empty(config.num_positions, h, **kw))
        self.pre_norm = nn.LayerNorm(h, eps=config.layer_norm_eps, **kw)
        self.layers = nn.ModuleList(
            EncoderLayer(
                h, config.num_attention_heads, config.intermediate_size, eps=config.layer_norm_eps,
                activation=config.hidden_act, pre_norm=True, **kw,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.post_norm = nn.LayerNorm(h, eps=config.layer_norm_eps, **kw)
        self.prepare()

    def _own_weights(self) -> dict[str, torch.Tensor]:
        return {"patch_embedding": self.patch_embedding.view(self.config.hidden_size, -1)}

    def prepare(self, sources=None) -> None:
        # The resized position tables derive from position_embedding, which changes value only where
        # prepare runs (loading, load_state_dict, .to()/.half(), a new backend) or where the caller
        # must call prepare() anyway (in-place edits): emptying the cache here keeps it current.
        self._position_cache = {}
        super().prepare(sources)

    def _positions(self, height: int, width: int) -> torch.Tensor:
        """The position table for a ``height`` x ``width`` image (``interpolate_pos_encoding``), computed
        once per size, dtype and device: a server or an embed run pays for the resize once."""
        cfg = self.config
        p = cfg.patch_size
        # transformers' rule: a square image with the native number of patches keeps the table.
        if (height // p) * (width // p) == cfg.num_patches and height == width:
            return self.position_embedding
        key = (height, width, self.dtype, self.device)
        table = self._position_cache.get(key)
        if table is None:
            table = interpolate_positions(self.position_embedding.detach(), height // p, width // p)
            self._position_cache[key] = table
        return table

    @classmethod
    def from_pretrained(cls, path_or_id, dtype=None, device=None, backend: str | None = None, *, torch_dtype=None,
                        device_map=None, **kwargs):
        """Load the vision tower of an AltCLIP checkpoint directory (or hub id), or a vision-only one.
        transformers' keywords: see :meth:`AltCLIPModel.from_pretrained`."""
        # Vision keys keep their "vision_model." prefix (as in transformers); this tower is flat.
        return _load_pretrained(
            cls, "vision", vision_key_map, path_or_id, dtype=dtype, torch_dtype=torch_dtype, device=device,
            device_map=device_map, backend=backend, strip="vision_model.", **kwargs,
        )

    main_input_name = "pixel_values"

    def get_input_embeddings(self) -> nn.Conv2d:
        """The patch embedding as the ``nn.Conv2d`` transformers returns (stride = kernel = patch size, no
        bias). It shares this model's parameter; the model itself runs it as a GEMM."""
        c, p = self.config.num_channels, self.config.patch_size
        with torch.device("meta"):
            conv = nn.Conv2d(c, self.config.hidden_size, p, stride=p, bias=False)
        conv.weight = self.patch_embedding
        return conv

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write a standalone vision-tower checkpoint that transformers' ``AltCLIPVisionModel`` and
        :meth:`from_pretrained` both load (keys under ``vision_model.``, which transformers 4 needs and
        5 accepts)."""
        check_save_kwargs(kwargs)
        key_map = prefixed(vision_key_map(self.config), "", "vision_model.")
        _save_pretrained(self, key_map, self.config.to_dict(), "AltCLIPVisionModel", save_directory)

    @torch.no_grad()
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ):
        check_call_kwargs("AltCLIPVisionModel.forward", kwargs)
        out = self.encode(
            pixel_values, output_attentions=bool(output_attentions), output_hidden_states=bool(output_hidden_states),
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        return out.to_tuple() if return_dict is False else out

    def _empty_outputs(self, seqlen: int, pooled_only: bool, output_attentions: bool, output_hidden_states: bool):
        """What ``encode`` returns for no images: every output with a batch dimension of 0."""
        cfg, kw = self.config, dict(device=self.device, dtype=self.dtype)
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        pooled = torch.empty(0, h, **kw)
        if pooled_only:
            return pooled
        layers = len(self.layers)
        return BaseModelOutputWithPooling(
            last_hidden_state=torch.empty(0, seqlen, h, **kw),
            pooler_output=pooled,
            hidden_states=tuple(torch.empty(0, seqlen, h, **kw) for _ in range(layers + 1))
            if output_hidden_states else None,
            attentions=tuple(torch.empty(0, heads, seqlen, seqlen, **kw) for _ in range(layers))
            if output_attentions else None,
        )

    def encode(
        self,
        pixel_values,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        pooled_only: bool = False,
        interpolate_pos_encoding: bool = False,
    ):
        """The tower's forward. With ``pooled_only`` it returns just the pooled ``[batch, hidden]``
        tensor, computing the last layer for the class token alone."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pooled_only and (output_attentions or output_hidden_states):
            raise ValueError("pooled_only computes no per-layer outputs")
        cfg = self.config
        device, dtype, ops = self.device, self.dtype, self.ops
        if pixel_values.dim() != 4 or pixel_values.shape[1] != cfg.num_channels:
            raise ValueError(
                f"pixel_values must be [batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}], "
                f"got {tuple(pixel_values.shape)}"
            )
        batch, _, height, width = pixel_values.shape
        native = (height, width) == (cfg.image_size, cfg.image_size)
        if not native and not interpolate_pos_encoding:
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model ({cfg.image_size}*{cfg.image_size})."
            )
        p = cfg.patch_size
        rows, cols = height // p, width // p
        if rows == 0 or cols == 0:
            raise ValueError(f"pixel_values of {height}x{width} hold no whole {p}x{p} patch")
        if batch == 0:  # empty outputs of the right shapes: kernels and reshapes need a token
            return self._empty_outputs(1 + rows * cols, pooled_only, output_attentions, output_hidden_states)
        positions = self.position_embedding if native else self._positions(height, width)
        pixel_values = pixel_values.to(device=device, dtype=dtype)
        h, seqlen = cfg.hidden_size, 1 + rows * cols
        weight = self._weight("patch_embedding")
        patches = _patch_rows(pixel_values, p, rows, cols, weight.shape[1])
        patch_embeds = ops.linear(patches, weight)
        x = torch.empty((batch, seqlen, h), device=device, dtype=dtype)
        x[:, 0] = self.class_embedding
        x[:, 1:] = patch_embeds.view(batch, rows * cols, h)
        x += positions
        x = ops.layer_norm(x.view(batch * seqlen, h), self.pre_norm.weight, self.pre_norm.bias, cfg.layer_norm_eps)

        layout = PaddedLayout(batch, seqlen, None)
        cls_rows = torch.arange(batch, device=device) * seqlen
        x, hidden_states, attentions = self._run_layers(
            x, layout, ops, keep_rows=cls_rows if pooled_only else None,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            to_grid=lambda t: t.view(batch, seqlen, h),
        )
        cls_states = x if pooled_only else x.index_select(0, cls_rows)
        pooled = ops.layer_norm(cls_states, self.post_norm.weight, self.post_norm.bias, cfg.layer_norm_eps)
        if pooled_only:
            return pooled
        return BaseModelOutputWithPooling(
            last_hidden_state=x.view(batch, seqlen, h),
            pooler_output=pooled,
            hidden_states=hidden_states,
            attentions=attentions,
        )


class AltCLIPModel(InferenceAPI, nn.Module):
    """Both towers, their projections and the learned temperature. Same API as ``reference.AltCLIPModel``.

    The backend (``backend``, else ``$ALTCLIP_FAST_BACKEND``, else by device) is resolved once: when the
    model is built or loaded, moved or converted (``.to()``, ``.cuda()``, ``.half()`` ...), loaded into
    (``load_state_dict``), or given another ``backend``. Each time, the backend's prepare step also
    derives the forms of the weights it runs fastest, kept next to the parameters (never in
    ``state_dict``, which holds the checkpoint's values) and counted by ``derived_nbytes()``:

    - torch backend, CPU, bf16/fp16 (where oneDNN's fused GEMM works): every GEMM weight pre-blocked
      for oneDNN, so no GEMM re-blocks its weight per call (a copy of each GEMM weight, and of the
      last layers' query and key/value parts of QKV, which the pooled-only path runs separately); and
      the vision MLP's quick_gelu folded into SiLU, which oneDNN fuses into fc1 (fc1 scaled by 1.702,
      fc2's weight by 1/1.702, derived in fp32 from the checkpoint at load so rounded once).
    - Triton backend: GEMM weights whose in-features are not a multiple of 16 (the patch embedding's
      3 x 14 x 14 = 588) zero-padded to a multiple of 64, so the kernel's rows are aligned (1.3 MB in
      bf16 for BAAI/AltCLIP).
    - otherwise (the torch backend in fp32 or on CUDA): nothing; ``derived_nbytes()`` is 0.

    After changing parameters in place, call ``prepare()``.
    """

    def __init__(self, config: AltCLIPConfig, *, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.config = config
        self._prepared: dict[str, tuple] = {}  # projection -> (the op set it was prepared for, its weight)
        self._defer_prepare = False
        self.register_load_state_dict_post_hook(_prepare_after_load)
        self.text_model = AltCLIPTextModel(config.text_config, backend=backend, **kw)
        self.vision_model = AltCLIPVisionModel(config.vision_config, backend=backend, **kw)
        self.text_projection = nn.Linear(config.text_config.project_dim, config.projection_dim, bias=False, **kw)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False, **kw)
        self.logit_scale = nn.Parameter(torch.empty((), **kw))
        self._prepare_projections()

    @property
    def backend(self) -> str | None:
        """``None`` (auto: ``$ALTCLIP_FAST_BACKEND``, else Triton on CUDA and torch on CPU), ``"auto"``,
        ``"torch"`` or ``"triton"``. Setting it re-resolves the op set and re-prepares the weights."""
        return self.text_model.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.text_model.backend = self.vision_model.backend = value
        self._prepare_projections()

    @torch.no_grad()
    def prepare(self, sources=None) -> None:
        """Resolve the backend for the current device and derive the backend's forms of the weights
        (see the class docstring). ``sources``: parameter -> the checkpoint tensor it was loaded from."""
        self.text_model.prepare(sources)
        self.vision_model.prepare(sources)
        self._prepare_projections()

    @torch.no_grad()
    def _prepare_projections(self) -> None:
        self._prepared = {}
        if self.device.type == "meta":
            return
        for name, tower in (("text_projection", self.text_model), ("visual_projection", self.vision_model)):
            self._prepared[name] = (tower.ops, tower.ops.prepare_weight(getattr(self, name).weight))

    def _projection(self, name: str, ops) -> torch.Tensor:
        """The projection's weight as ``ops`` takes it: its derived form if prepared for ``ops``."""
        prepared_for, weight = self._prepared.get(name, (None, None))
        return weight if prepared_for is ops else getattr(self, name).weight

    def derived_nbytes(self) -> int:
        """Bytes held by the backend's derived copies of the weights (see the class docstring); 0 when
        the backend runs the parameters themselves."""
        own = derived_nbytes((w for _, w in self._prepared.values()), self.parameters())
        return own + self.text_model.derived_nbytes() + self.vision_model.derived_nbytes()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)  # the towers re-prepare themselves
        self._prepare_projections()
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_projection.weight.device

    @classmethod
    def from_pretrained(
        cls, path_or_id, dtype=None, device=None, backend: str | None = None, *, torch_dtype=None, device_map=None,
        **kwargs,
    ) -> "AltCLIPModel":
        """Load a checkpoint directory (or hub id) as ``reference.AltCLIPModel.from_pretrained`` does.

        ``dtype``: float32 (default), float16 or bfloat16 (or their names), or ``"auto"`` (the config's
        dtype, else the checkpoint's); weights are converted once, here. ``backend``: see :attr:`backend`.
        transformers' keywords: ``torch_dtype`` (its old name for ``dtype``); ``device_map`` (one device,
        an index, ``"auto"``, or a dict placing everything on one device); ``revision``, ``cache_dir``,
        ``local_files_only``, ``token``, ``force_download``, ``subfolder`` (hub ids); ``config``;
        ``output_loading_info``; ``use_safetensors``; ``attn_implementation`` (accepted: every choice
        gives the same outputs, and the fast model runs its own attention). The others are refused by
        name with the reason (``compat.REFUSED``), unless given their default.
        """
        ckpt, dtype, device, loading_info = read_pretrained(
            path_or_id, "model", dtype=dtype, torch_dtype=torch_dtype, device=device, device_map=device_map,
            kwargs=kwargs,
        )
        model = cls.from_state_dict(
            ckpt.config, ckpt.state_dict, dtype=dtype, device=device, backend=backend, source=ckpt.source
        )
        return with_loading_info(model, loading_info)

    @classmethod
    def from_state_dict(
        cls, config: AltCLIPConfig, state_dict: Mapping[str, torch.Tensor], *, dtype=None, device=None,
        backend: str | None = None, source: str = "state dict", torch_dtype=None, device_map=None,
    ) -> "AltCLIPModel":
        """Build from a state dict in the canonical key layout (``checkpoint.canonicalize_keys``).
        ``dtype`` / ``torch_dtype`` and ``device`` / ``device_map`` as in :meth:`from_pretrained`."""
        dtype, device = dtype_arg(dtype, torch_dtype), device_arg(device, device_map)
        if isinstance(dtype, str) and dtype == "auto":
            dtype = float_dtype(state_dict) or torch.float32
        with torch.device("meta"):
            model = cls(config, backend=backend)
        _load_fused(
            model, model_key_map(config), state_dict, dtype=resolve_dtype(dtype), device=device, source=source
        )
        return model.eval()

    def get_input_embeddings(self) -> nn.Embedding:
        """The text tower's word embeddings (``input_ids`` is the main input). transformers' AltCLIPModel
        raises NotImplementedError here."""
        return self.text_model.get_input_embeddings()

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write ``config.json`` and ``model.safetensors`` (canonical keys, the model's dtype), which
        transformers' ``AltCLIPModel.from_pretrained`` and :meth:`from_pretrained` both load."""
        check_save_kwargs(kwargs)
        _save_pretrained(self, model_key_map(self.config), self.config.to_dict(), "AltCLIPModel", save_directory)

    @torch.no_grad()
    def get_text_features(
        self, input_ids=None, attention_mask=None, position_ids=None, token_type_ids=None, *,
        output_attentions: bool | None = None, output_hidden_states: bool | None = None,
        return_dict: bool | None = None, **kwargs,
    ):
        """``[batch, projection_dim]`` text embeddings (not normalised), as transformers 4 returns them.

        Asking for more (``output_hidden_states``, ``output_attentions`` or ``return_dict=True``) returns
        transformers 5's object instead: the text tower's output with ``pooler_output`` the embeddings
        (a tuple with ``return_dict=False``)."""
        check_call_kwargs("get_text_features", kwargs)
        ops = self.text_model.ops
        if not (output_attentions or output_hidden_states or return_dict):
            pooled = self.text_model.encode(input_ids, attention_mask, token_type_ids, position_ids, pooled_only=True)
            return ops.linear(pooled, self._projection("text_projection", ops))
        out = self.text_model.encode(
            input_ids, attention_mask, token_type_ids, position_ids,
            output_attentions=bool(output_attentions), output_hidden_states=bool(output_hidden_states),
        )
        out.pooler_output = ops.linear(out.pooler_output, self._projection("text_projection", ops))
        return out.to_tuple() if return_dict is False else out

    @torch.no_grad()
    def get_image_features(
        self, pixel_values=None, interpolate_pos_encoding: bool = False, *,
        output_attentions: bool | None = None, output_hidden_states: bool | None = None,
        return_dict: bool | None = None, **kwargs,
    ):
        """``[batch, projection_dim]`` image embeddings (not normalised), as transformers 4 returns them.
        ``interpolate_pos_encoding``: accept other image sizes, resizing the position embeddings.
        Asking for more returns transformers 5's object, as :meth:`get_text_features` does."""
        check_call_kwargs("get_image_features", kwargs)
        ops = self.vision_model.ops
        if not (output_attentions or output_hidden_states or return_dict):
            pooled = self.vision_model.encode(
                pixel_values, pooled_only=True, interpolate_pos_encoding=interpolate_pos_encoding
            )
            return ops.linear(pooled, self._projection("visual_projection", ops))
        out = self.vision_model.encode(
            pixel_values, output_attentions=bool(output_attentions), output_hidden_states=bool(output_hidden_states),
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        out.pooler_output = ops.linear(out.pooler_output, self._projection("visual_projection", ops))
        return out.to_tuple() if return_dict is False else out

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ):
        check_call_kwargs("AltCLIPModel.forward", kwargs)
        output_attentions, output_hidden_states = bool(output_attentions), bool(output_hidden_states)
        if input_ids is None or pixel_values is None:
            raise ValueError("AltCLIPModel.forward needs both input_ids and pixel_values")
        vision_out = self.vision_model.encode(
            pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        text_out = self.text_model.encode(
            input_ids, attention_mask, token_type_ids, position_ids,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )
        text_ops, vision_ops = self.text_model.ops, self.vision_model.ops
        image_embeds = vision_ops.linear(vision_out.pooler_output, self._projection("visual_projection", vision_ops))
        text_embeds = text_ops.linear(text_out.pooler_output, self._projection("text_projection", text_ops))
        image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * self.logit_scale.exp()
        logits_per_image = logits_per_text.t()
        out = AltCLIPOutput(
            loss=clip_loss(logits_per_text) if return_loss else None,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_out,
            vision_model_output=vision_out,
        )
        return out.to_tuple() if return_dict is False else out
