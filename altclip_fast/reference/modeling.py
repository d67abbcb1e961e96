"""Plain PyTorch AltCLIP, faithful to transformers' ``modeling_altclip.py`` (as of transformers 4.38).

This is the numerical ground truth: readable, eval-only, no fusion and no kernels. Module names
mirror transformers' parameter names so that a checkpoint loads without renaming (beyond the two
key layouts that ``altclip_fast.modeling.checkpoint.canonicalize_keys`` folds into one).

The two towers keep transformers' two layer classes on purpose, so the reference reads line by line
against transformers. They share the attention math (``eager_attention``) and differ only in where
the LayerNorm sits (post-LN text, pre-LN vision) and in the activation (exact GELU, quick_gelu).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from altclip_fast.dtypes import resolve_dtype
from altclip_fast.modeling.checkpoint import load_checkpoint, load_into
from altclip_fast.modeling.config import AltCLIPConfig, AltCLIPTextConfig, AltCLIPVisionConfig
from altclip_fast.modeling.outputs import AltCLIPOutput, BaseModelOutputWithPooling, BaseModelOutputWithPoolingAndProjection

from . import ops

__all__ = ["AltCLIPModel", "AltCLIPTextModel", "AltCLIPVisionModel", "roberta_position_ids", "clip_loss"]


# The oracle's own copy (altclip_fast.modeling.model has another): a shared bug would hide from parity tests.
def roberta_position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa positions: real tokens count from ``padding_idx + 1``; pads keep ``padding_idx``."""
    real = input_ids.ne(padding_idx).long()
    return torch.cumsum(real, dim=1) * real + padding_idx


def additive_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[batch, seq] 1/0 mask -> [batch, 1, 1, seq] additive mask: 0 keeps a key, dtype's min drops it."""
    if attention_mask is None:
        return None
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


# The oracle's own copy (the fast model's is in altclip_fast.ops): a shared bug would hide from parity tests.
def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over ``[batch, heads, seq, head_dim]``; softmax in fp32 as transformers does.
    Returns the context ``[batch, seq, heads * head_dim]`` and the attention probabilities."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    context = torch.matmul(probs, v).transpose(1, 2)
    return context.reshape(context.shape[0], context.shape[1], -1), probs


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, seq, hidden] -> [batch, heads, seq, head_dim]."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


# --------------------------------------------------------------------------- text tower (XLM-R)


class AltRobertaEmbeddings(nn.Module):
    def __init__(self, config: AltCLIPTextConfig):
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        if position_ids is None:
            if input_ids is not None:
                position_ids = roberta_position_ids(input_ids, self.padding_idx)
            else:  # without ids nothing is known to be padding: every slot is a real token
                position_ids = torch.arange(self.padding_idx + 1, seq + self.padding_idx + 1, device=inputs_embeds.device)
                position_ids = position_ids.expand(batch, seq)
        if token_type_ids is None:
            token_type_ids = torch.zeros((batch, seq), dtype=torch.long, device=inputs_embeds.device)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.LayerNorm(embeddings)


class AltRobertaSelfAttention(nn.Module):
    def __init__(self, config: AltCLIPTextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, mask):
        q, k, v = (split_heads(proj(hidden_states), self.num_heads) for proj in (self.query, self.key, self.value))
        return eager_attention(q, k, v, mask)


class AltRobertaSelfOutput(nn.Module):
    def __init__(self, config: AltCLIPTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)  # post-LN


class AltRobertaAttention(nn.Module):
    def __init__(self, config: AltCLIPTextConfig):
        super().__init__()
        self.self = AltRobertaSelfAttention(config)
        self.output = AltRobertaSelfOutput(config)

    def forward(self, hidden_states, mask):
        context, probs = self.self(hidden_states, mask)
        return self.output(context, hidden_states), probs


class AltRobertaIntermediate(nn.Module):
    def __init__(self, config: AltCLIPTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ops.get_activation(config.hidden_act)

    def forward(self, hidden_states):
        return self.act(self.dense(hidden_states))


class AltRobertaOutput(nn.Module):
    def __init__(self, config: AltCLIPTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)  # post-LN


class AltRobertaLayer(nn.Module):
    def __init__(self, config: AltCLIPTextConfig):
        super().__init__()
        self.attention = AltRobertaAttention(config)
        self.intermediate = AltRobertaIntermediate(config)
        self.output = AltRobertaOutput(config)

    def forward(self, hidden_states, mask):
        attention_output, probs = self.attention(hidden_states, mask)
        return self.output(self.intermediate(attention_output), attention_output), probs


class AltRobertaEncoder(nn.Module):
    def __init__(self, config: AltCLIPTextConfig):
        super().__init__()
        self.layer = nn.ModuleList(AltRobertaLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states, mask):
        return _run_layers(self.layer, hidden_states, mask)


class AltRobertaModel(nn.Module):
    def __init__(self, config: AltCLIPTextConfig):
        super().__init__()
        self.embeddings = AltRobertaEmbeddings(config)
        self.encoder = AltRobertaEncoder(config)


def _run_layers(layers, hidden_states, mask):
    """Run encoder layers, collecting every hidden state (the input first) and attention map."""
    all_hidden, all_probs = [hidden_states], []
    for layer in layers:
        hidden_states, probs = layer(hidden_states, mask)
        all_hidden.append(hidden_states)
        all_probs.append(probs)
    return hidden_states, tuple(all_hidden), tuple(all_probs)


def _finish(output, output_hidden_states: bool, output_attentions: bool, hidden, probs, return_dict: bool):
    output.hidden_states = hidden if output_hidden_states else None
    output.attentions = probs if output_attentions else None
    return output if return_dict else output.to_tuple()


def _check_text_inputs(config: AltCLIPTextConfig, input_ids, attention_mask, inputs_embeds):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape[:-1])
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {shape}")
    if input_ids is not None and input_ids.is_floating_point():
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if shape[1] > config.max_text_length:
        raise ValueError(
            f"sequence length {shape[1]} exceeds the model's maximum of {config.max_text_length} tokens "
            f"(max_position_embeddings {config.max_position_embeddings}, positions start at pad_token_id + 1)"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask must have shape {shape} like input_ids, got {tuple(attention_mask.shape)}")


class _FromPretrained:
    """``from_pretrained(path_or_id, dtype=None, device=None)`` for every reference class."""

    _part: str

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike, dtype: torch.dtype | str | None = None, device=None
    ):
        """Load a local directory or hub id. ``dtype`` None means float32; ``device`` None means CPU."""
        ckpt = load_checkpoint(path_or_id, cls._part)
        with torch.device("meta"):
            model = cls(ckpt.config)
        load_into(model, ckpt.state_dict, dtype=resolve_dtype(dtype), device=device or "cpu", source=ckpt.source)
        return model.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class AltCLIPTextModel(_FromPretrained, nn.Module):
    """XLM-R encoder, then ``pre_LN`` (a LayerNorm *after* the encoder), then ``transformation``
    on every token. The pooled output is token 0 of the projected states."""

    _part = "text"

    def __init__(self, config: AltCLIPTextConfig):
        super().__init__()
        self.config = config
        self.roberta = AltRobertaModel(config)
        self.transformation = nn.Linear(config.hidden_size, config.project_dim)
        self.pre_LN = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ):
        _check_text_inputs(self.config, input_ids, attention_mask, inputs_embeds)
        hidden = self.roberta.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        mask = additive_mask(attention_mask, hidden.dtype)
        sequence, all_hidden, all_probs = self.roberta.encoder(hidden, mask)
        projection_state = self.transformation(self.pre_LN(sequence))
        output = BaseModelOutputWithPoolingAndProjection(
            last_hidden_state=projection_state, pooler_output=projection_state[:, 0]
        )
        return _finish(output, output_hidden_states, output_attentions, all_hidden, all_probs, return_dict)


# --------------------------------------------------------------------------- vision tower (CLIP ViT)


class AltCLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: AltCLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def interpolate_pos_encoding(self, embeddings, height: int, width: int):
        """The position table resized for a ``height`` x ``width`` image, as transformers' CLIP does it:
        the class position is kept, the patch positions are resized on their square grid (bicubic,
        ``align_corners=False``, in the table's dtype). A square image with the native number of
        patches keeps the table as it is."""
        table = self.position_embedding.weight
        num_patches, num_positions = embeddings.shape[1] - 1, table.shape[0] - 1
        if num_patches == num_positions and height == width:
            return table
        dim, grid = table.shape[-1], int(num_positions**0.5)
        patch = self.patch_embedding.stride[0]
        patch_pos = table[1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(height // patch, width // patch), mode="bicubic", align_corners=False)
        return torch.cat([table[:1], patch_pos.permute(0, 2, 3, 1).reshape(-1, dim)], dim=0)

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False):
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [batch, num_patches, hidden]
        cls = self.class_embedding.expand(pixel_values.shape[0], 1, -1)
        embeddings = torch.cat([cls, patches], dim=1)
        if interpolate_pos_encoding:
            height, width = pixel_values.shape[-2:]
            return embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        return embeddings + self.position_embedding.weight


class AltCLIPAttention(nn.Module):
    def __init__(self, config: AltCLIPVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, mask):
        q, k, v = (split_heads(proj(hidden_states), self.num_heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        context, probs = eager_attention(q, k, v, mask)
        return self.out_proj(context), probs


class AltCLIPMLP(nn.Module):
    def __init__(self, config: AltCLIPVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ops.get_activation(config.hidden_act)

    def forward(self, hidden_states):
        return self.fc2(self.act(self.fc1(hidden_states)))


class AltCLIPEncoderLayer(nn.Module):
    def __init__(self, config: AltCLIPVisionConfig):
        super().__init__()
        self.self_attn = AltCLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = AltCLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, mask):
        attn_out, probs = self.self_attn(self.layer_norm1(hidden_states), mask)  # pre-LN
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.layer_norm2(hidden_states))
        return hidden_states, probs


class AltCLIPEncoder(nn.Module):
    def __init__(self, config: AltCLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(AltCLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states, mask=None):
        return _run_layers(self.layers, hidden_states, mask)


def _check_pixels(config: AltCLIPVisionConfig, pixel_values, interpolate_pos_encoding: bool = False):
    expected = (config.num_channels, config.image_size, config.image_size)
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != config.num_channels:
        raise ValueError(f"pixel_values must be [batch, {', '.join(map(str, expected))}], got {tuple(pixel_values.shape)}")
    height, width = pixel_values.shape[-2:]
    if not interpolate_pos_encoding and (height, width) != expected[1:]:
        raise ValueError(
            f"Input image size ({height}*{width}) doesn't match model ({config.image_size}*{config.image_size})."
        )
    if min(height, width) < config.patch_size:
        raise ValueError(f"pixel_values of {height}x{width} hold no whole {config.patch_size}x{config.patch_size} patch")


class AltCLIPVisionTransformer(nn.Module):
    """Patch embedding, ``pre_layrnorm`` (sic), pre-LN layers, ``post_layernorm`` on the CLS token."""

    def __init__(self, config: AltCLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = AltCLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = AltCLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, pixel_values, output_attentions=False, output_hidden_states=False, return_dict=True,
        interpolate_pos_encoding: bool = False,
    ):
        _check_pixels(self.config, pixel_values, interpolate_pos_encoding)
        hidden = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        last, all_hidden, all_probs = self.encoder(hidden)
        output = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=self.post_layernorm(last[:, 0]))
        return _finish(output, output_hidden_states, output_attentions, all_hidden, all_probs, return_dict)


class AltCLIPVisionModel(_FromPretrained, nn.Module):
    _part = "vision"

    def __init__(self, config: AltCLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = AltCLIPVisionTransformer(config)

    def forward(
        self, pixel_values, output_attentions=False, output_hidden_states=False, return_dict=True,
        interpolate_pos_encoding: bool = False,
    ):
        return self.vision_model(pixel_values, output_attentions, output_hidden_states, return_dict, interpolate_pos_encoding)


# --------------------------------------------------------------------------- the dual encoder


# The oracle's own copy (altclip_fast.modeling.model has another): a shared bug would hide from parity tests.
def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss: text i matches image i."""
    targets = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.t(), targets)) / 2.0


class AltCLIPModel(_FromPretrained, nn.Module):
    _part = "model"

    def __init__(self, config: AltCLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = AltCLIPTextModel(config.text_config)
        self.vision_model = AltCLIPVisionTransformer(config.vision_config)
        self.text_projection = nn.Linear(config.text_config.project_dim, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None, token_type_ids=None):
        """Projected (not normalised) text embeddings, ``[batch, projection_dim]``."""
        pooled = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, token_type_ids=token_type_ids
        ).pooler_output
        return self.text_projection(pooled)

    def get_image_features(self, pixel_values=None, interpolate_pos_encoding: bool = False):
        """Projected (not normalised) image embeddings, ``[batch, projection_dim]``."""
        pooled = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).pooler_output
        return self.visual_projection(pooled)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        token_type_ids=None,
        return_loss: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
        interpolate_pos_encoding: bool = False,
    ):
        if input_ids is None or pixel_values is None:
            raise ValueError(
                "AltCLIPModel.forward needs both input_ids and pixel_values; for one tower use "
                "get_text_features or get_image_features"
            )
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        text_outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            token_type_ids=token_type_ids, **flags,
        )
        vision_outputs = self.vision_model(pixel_values, **flags, interpolate_pos_encoding=interpolate_pos_encoding)
        image_embeds = self.visual_projection(vision_outputs.pooler_output)
        text_embeds = self.text_projection(text_outputs.pooler_output)
        image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * self.logit_scale.exp()
        output = AltCLIPOutput(
            loss=clip_loss(logits_per_text) if return_loss else None,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )
        return output if return_dict else output.to_tuple()
