"""Random AltCLIP checkpoints, written the ways users get them, for tests that cannot download.

- ``random_hf_model(config)``: a transformers ``AltCLIPModel`` with random weights. Every parameter is
  drawn fresh (LayerNorm gains and biases too), so a wrong norm placement or a wrong bias cannot hide
  behind the identity-like values of a default init.
- ``save_hf(model, dir)``: transformers' own ``save_pretrained`` (transformers 5 key layout).
- ``save_raw(state_dict, config, dir, ...)``: the same weights as a hand-written file in the
  transformers-4 layout of the BAAI/AltCLIP hub file, with stale buffers, as ``pytorch_model.bin``,
  ``model.safetensors`` or a sharded safetensors index.
- ``make_text_batch`` / ``make_pixels``: inputs with texts of different lengths padded with a mask.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from altclip_fast.modeling.config import AltCLIPConfig


def tiny_config(
    *,
    text_hidden: int = 40,
    text_heads: int = 2,
    vision_hidden: int = 48,
    vision_heads: int = 3,
    layers: int = 2,
    image_size: int = 30,
    patch_size: int = 7,
    vocab_size: int = 101,
    project_dim: int = 24,
    projection_dim: int = 12,
    max_position_embeddings: int = 40,
) -> AltCLIPConfig:
    """A small AltCLIP with odd sizes (head_dim 20 and 16, 4x4+1 = 17 image tokens by default)."""
    return AltCLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=text_hidden, num_attention_heads=text_heads,
            num_hidden_layers=layers, intermediate_size=3 * text_hidden + 1, project_dim=project_dim,
            max_position_embeddings=max_position_embeddings,
        ),
        vision_config=dict(
            hidden_size=vision_hidden, num_attention_heads=vision_heads, num_hidden_layers=layers,
            intermediate_size=2 * vision_hidden + 3, image_size=image_size, patch_size=patch_size,
            projection_dim=projection_dim,
        ),
        projection_dim=projection_dim,
    )


# Small configs with the awkward sizes the parity tests sweep, by name.
ODD_CONFIGS = {
    # text head_dim 20, vision head_dim 16, 4x4 patches + CLS = 17 image tokens
    "hd20-hd16": tiny_config(),
    # hidden 60 / 80 (not powers of two), 7x7 patches + CLS = 50 tokens, 3 layers
    "odd-50tok": tiny_config(
        text_hidden=60, text_heads=3, vision_hidden=80, vision_heads=5, layers=3, image_size=50, patch_size=7
    ),
    # image 44 with patch 8 leaves a ragged border the conv drops: 5x5 + CLS = 26 tokens
    "ragged-26tok": tiny_config(
        text_hidden=48, text_heads=3, vision_hidden=60, vision_heads=3, image_size=44, patch_size=8, project_dim=20
    ),
}

# Texts of different lengths, padded to the longest with an attention mask; one is a single token.
MIXED_LENGTHS = [5, 9, 3, 9, 1]


def hf_config(config: AltCLIPConfig):
    """The transformers config for the same architecture."""
    import transformers

    def section(sub):
        d = sub.to_dict()
        d.pop("model_type")
        return d

    return transformers.AltCLIPConfig(
        text_config=section(config.text_config),
        vision_config=section(config.vision_config),
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw every parameter afresh, at scales that keep activations O(1) through the layers."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.dim() == 0:  # logit_scale
            p.copy_(torch.tensor(2.0 + torch.rand((), generator=gen).item()))
        elif p.dim() == 1 and ("LayerNorm" in name or "layer_norm" in name or "layrnorm" in name or "pre_LN" in name):
            if name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        elif p.dim() == 1:  # biases and the class embedding
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p[0].numel() if p.dim() > 1 and "embedding" not in name else 1
            std = 1.0 / math.sqrt(fan_in) if fan_in > 1 else 0.5
            p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def random_hf_model(config: AltCLIPConfig, seed: int = 0, attn_implementation: str = "sdpa"):
    """A transformers ``AltCLIPModel`` in eval mode, fp32, every weight random."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AltCLIPModel(hf_config(config))
    if attn_implementation != "sdpa":
        model.set_attn_implementation(attn_implementation)
    return randomize_(model, seed).eval()


def save_hf(model, directory: str | Path) -> Path:
    """transformers' ``save_pretrained``: config.json + model.safetensors, transformers 5 key layout."""
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory


def to_transformers4_layout(state_dict: dict[str, torch.Tensor], config: AltCLIPConfig) -> dict[str, torch.Tensor]:
    """Rename to the BAAI/AltCLIP hub file's layout and add the stale buffers such files carry."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"vision_model\.encoder\.layer\.(\d+)\.", r"vision_model.encoder.layers.\1.", key)
        out[key] = value.clone()
    out["text_model.roberta.embeddings.position_ids"] = torch.arange(
        config.text_config.max_position_embeddings
    )[None]
    out["vision_model.embeddings.position_ids"] = torch.arange(config.vision_config.num_positions)[None]
    return out


def save_raw(
    state_dict: dict[str, torch.Tensor],
    config: AltCLIPConfig,
    directory: str | Path,
    *,
    fmt: str = "bin",
    shards: int = 1,
) -> Path:
    """Write ``state_dict`` with a config.json, as ``pytorch_model.bin`` (fmt="bin") or safetensors
    (fmt="safetensors"), optionally split over ``shards`` files with an index."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_cfg = hf_config(config)
    (directory / "config.json").write_text(hf_cfg.to_json_string())
    if fmt == "bin":
        torch.save(state_dict, directory / "pytorch_model.bin")
    elif fmt == "safetensors" and shards == 1:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, directory / "model.safetensors")
    elif fmt == "safetensors":
        keys = sorted(state_dict)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: state_dict[k].contiguous() for k in part}, directory / name)
            weight_map.update({k: name for k in part})
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
        )
    else:
        raise ValueError(f"unknown fmt {fmt!r}")
    return directory


def make_text_batch(
    config: AltCLIPConfig, lengths: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` for texts of the given lengths (bos ... eos), right-padded."""
    tc = config.text_config
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), tc.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        body = torch.randint(3, tc.vocab_size, (n,), generator=gen)
        body[0], body[-1] = tc.bos_token_id, tc.eos_token_id
        ids[row, :n] = body
        mask[row, :n] = 1
    return ids, mask


def make_pixels(config: AltCLIPConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """Normalised-looking pixel values ``[batch, channels, size, size]``."""
    vc = config.vision_config
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, vc.num_channels, vc.image_size, vc.image_size), generator=gen)
