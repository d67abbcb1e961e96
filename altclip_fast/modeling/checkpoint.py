"""Finding, reading and checking AltCLIP checkpoints. Shared by the reference and the fast model.

- ``read_state_dict``: ``model.safetensors``, a sharded ``model.safetensors.index.json``, or
  ``pytorch_model.bin`` (optionally sharded), read with ``weights_only=True``.
- ``canonicalize_keys``: one key layout whatever wrote the file (see below), stale buffers dropped.
- ``load_into``: checks every name and shape against a module, then assigns the tensors.

Key layouts. The BAAI/AltCLIP hub file (transformers 4) names layers ``vision_model.encoder.layers.N``
and ``text_model.roberta.encoder.layer.N``; transformers 5's ``save_pretrained`` writes ``layer.N``
for both towers. The canonical layout is transformers 4.38's, which the reference's modules mirror.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import CheckpointError, ConfigError
from ..model_files import WEIGHTS_FILES, find_weights, read_json, resolve_model_dir
from .config import AltCLIPConfig, AltCLIPTextConfig, AltCLIPVisionConfig, is_flagai_config, read_config_json
from .lazy_tensors import LazyStateDict, can_read_lazily, open_safetensors, renamed

__all__ = [
    "read_state_dict",
    "canonicalize_keys",
    "rekey",
    "tensor_spec",
    "float_dtype",
    "copy_into",
    "release",
    "check_state_dict",
    "load_into",
    "Checkpoint",
    "load_checkpoint",
]

def read_state_dict(model_dir: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The tensors of the checkpoint in ``model_dir``, keys as stored. safetensors files are read
    lazily (a ``LazyStateDict``: each tensor is read when asked for, so a loader can convert it into
    its destination without holding the file); ``pytorch_model.bin`` files are read whole."""
    weights = find_weights(model_dir)
    if weights is None:
        raise CheckpointError(f"{model_dir} has no weights: expected one of {', '.join(WEIGHTS_FILES)}")
    if weights.name.endswith(".index.json"):
        return _read_sharded(weights)
    if weights.suffix == ".safetensors" and can_read_lazily():
        return open_safetensors([weights])
    return _read_file(weights)


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} could not be read ({type(exc).__name__}: {str(exc).strip()[:200]}); "
            "it may be truncated or corrupt: download it again"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def _read_sharded(index_path: Path) -> Mapping[str, torch.Tensor]:
    index = read_json(index_path, error=CheckpointError)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path} is not a valid shard index (no 'weight_map' object)")
    shard_paths = []
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path} names shard {shard}, which is missing from {index_path.parent}")
        shard_paths.append(shard_path)
    if index_path.name.startswith("model.safetensors") and can_read_lazily():
        state: Mapping[str, torch.Tensor] = open_safetensors(shard_paths)
    else:
        state = {}
        for shard_path in shard_paths:
            state.update(_read_file(shard_path))
    listed_but_absent = sorted(set(weight_map) - set(state))
    if listed_but_absent:
        raise CheckpointError(
            f"{index_path} lists tensors its shards do not hold: {_preview(listed_but_absent)}"
        )
    return state


# Buffers that older files saved and that the models recompute: position ids, token type ids.
_STALE_BUFFER = re.compile(r"(^|\.)(position_ids|token_type_ids)$")
# A head that FlagAI's AltCLIP code (which trained AltCLIP-m9/m18) builds and saves but CLIP inference
# never reads: ``transformation_pre`` projects the penultimate text layer for AltDiffusion.
# transformers' AltCLIP has no such module and skips it the same way.
_UNUSED_HEAD = re.compile(r"(^|\.)transformation_pre\.(weight|bias)$")
_VISION_LAYER = re.compile(r"^(|.*\.)(vision_model\.encoder)\.layer\.(\d+)\.")
_TEXT_LAYER = re.compile(r"^(|.*\.)(roberta\.encoder)\.layers\.(\d+)\.")


def _canonical_key(key: str) -> str | None:
    if _STALE_BUFFER.search(key) or _UNUSED_HEAD.search(key):
        return None
    key = _VISION_LAYER.sub(r"\1\2.layers.\3.", key)
    return _TEXT_LAYER.sub(r"\1\2.layer.\3.", key)


def canonicalize_keys(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Rename keys to the transformers 4.38 layout and drop stale buffers and FlagAI's unused
    ``transformation_pre`` head. A ``LazyStateDict`` stays lazy."""
    return rekey(state_dict, _canonical_key)


def rekey(state_dict: Mapping[str, torch.Tensor], rename: Callable[[str], str | None]) -> Mapping[str, torch.Tensor]:
    """The same tensors under ``rename(key)`` (None: left out), without reading a lazy state dict."""
    if isinstance(state_dict, LazyStateDict):
        return state_dict.rekeyed(rename)
    return renamed(state_dict.items(), rename)


def tensor_spec(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and shape of ``state_dict[key]``, without reading a lazy state dict."""
    if isinstance(state_dict, LazyStateDict):
        dtype, shape = state_dict.spec(key)
        return dtype, tuple(shape)
    tensor = state_dict[key]
    return tensor.dtype, tuple(tensor.shape)


def float_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype of the first floating-point tensor, or None if there is none."""
    for key in state_dict:
        dtype = tensor_spec(state_dict, key)[0]
        if dtype.is_floating_point:
            return dtype
    return None


def copy_into(state_dict: Mapping[str, torch.Tensor], key: str, out: torch.Tensor) -> None:
    """``out.copy_(state_dict[key])``; a lazy state dict converts into ``out`` as it reads, so the
    stored tensor is never held whole."""
    if isinstance(state_dict, LazyStateDict):
        state_dict.read_into(key, out)
    else:
        out.copy_(state_dict[key])


def release(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Tell a lazy state dict that loading is done: it closes its files and drops their cached pages."""
    if isinstance(state_dict, LazyStateDict):
        state_dict.release()


def _preview(names: Iterable[str], limit: int = 20) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Raise CheckpointError listing every missing key, unexpected key and shape mismatch (with shapes)
    between ``expected`` (key -> shape) and ``state_dict``."""
    shape = lambda k: tensor_spec(state_dict, k)[1]  # noqa: E731
    missing = [f"{k} {tuple(expected[k])}" for k in sorted(set(expected) - set(state_dict))]
    unexpected = [f"{k} {shape(k)}" for k in sorted(set(state_dict) - set(expected))]
    mismatched = [
        f"{k}: checkpoint {shape(k)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state_dict))
        if shape(k) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_preview(mismatched, 10)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model config:\n  " + "\n  ".join(problems))


def load_into(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    source: str = "checkpoint",
) -> None:
    """Assign ``state_dict`` to ``module`` after checking that names and shapes match exactly.

    ``module`` may live on the meta device: every parameter is replaced, none is left at its
    initial value. Floating-point tensors are converted to ``dtype`` once, here.
    """
    check_state_dict({k: tuple(v.shape) for k, v in module.state_dict().items()}, state_dict, source)
    tensors = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state_dict.items()
    }
    module.load_state_dict(tensors, strict=True, assign=True)


class Checkpoint(NamedTuple):
    """What a model class needs to build itself: its config and its canonical weights."""

    config: Any  # AltCLIPConfig, AltCLIPTextConfig or AltCLIPVisionConfig, as ``part`` asks
    state_dict: Mapping[str, torch.Tensor]  # a LazyStateDict for safetensors files
    source: str  # the weights file, for error messages


# Standalone tower checkpoints (transformers' AltCLIPTextModel / AltCLIPVisionModel.save_pretrained)
# name their config so; a full model's keys carry a tower prefix that a standalone tower lacks.
_PARTS = {
    "model": (AltCLIPConfig, None, None),
    "text": (AltCLIPTextConfig, "text_config", "text_model."),
    "vision": (AltCLIPVisionConfig, "vision_config", "vision_model."),
}


def load_checkpoint(path_or_id: str | os.PathLike, part: str = "model") -> Checkpoint:
    """Read config and weights for the whole model (``part="model"``) or one tower (``"text"``,
    ``"vision"``). A tower may come from a full AltCLIP checkpoint (the other tower's weights are
    then left out on purpose) or from a standalone tower checkpoint. Keys are canonical."""
    if part not in _PARTS:
        raise ValueError(f"part must be one of {sorted(_PARTS)}, got {part!r}")
    config_cls, section, prefix = _PARTS[part]
    model_dir = resolve_model_dir(path_or_id)
    raw = read_config_json(model_dir / "config.json")
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if is_flagai_config(raw):  # a whole AltCLIP under CLIP's name (see AltCLIPConfig.from_dict)
        model_type = AltCLIPConfig.model_type
    weights = find_weights(model_dir)
    state = read_state_dict(model_dir)
    source = str(weights)
    if part == "vision" and model_type == config_cls.model_type and not any(k.startswith(prefix) for k in state):
        # transformers 5's standalone AltCLIPVisionModel dropped the "vision_model." level of 4.x.
        state = rekey(state, lambda k: prefix + k)
    state = canonicalize_keys(state)
    if part == "model" or model_type == config_cls.model_type:
        return Checkpoint(config_cls.from_dict(raw), state, source)
    if model_type != AltCLIPConfig.model_type:
        raise ConfigError(
            f"{model_dir / 'config.json'}: model_type must be 'altclip' or {config_cls.model_type!r}, got {model_type!r}"
        )
    config = getattr(AltCLIPConfig.from_dict(raw), section)
    if part == "text":  # AltCLIPTextModel's own keys are the full model's minus "text_model."
        state = rekey(state, lambda k: k[len(prefix):] if k.startswith(prefix) else None)
    else:  # AltCLIPVisionModel keeps the "vision_model." prefix, as in transformers
        state = rekey(state, lambda k: k if k.startswith(prefix) else None)
    return Checkpoint(config, state, source)
