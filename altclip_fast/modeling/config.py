"""AltCLIP configuration, read from a transformers ``config.json`` (model_type ``altclip``).

The Python defaults are the real BAAI/AltCLIP architecture: an XLM-R large text tower and a
ViT-L/14 vision tower at 224 px.

Reading a file follows transformers' own reading of it: a field the file leaves out takes
*transformers'* default for that field. Those equal BAAI/AltCLIP's everywhere except six vision
sizes, where transformers defaults to ViT-B/32 (see ``_TRANSFORMERS_VISION_DEFAULTS``). Reading a
file any other way would give a different model than transformers builds from the same file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError
# Activations the towers may use: the kernels' list (a Triton-free module), which the reference also implements.
from ..kernels.activations import ACTIVATIONS
from ..model_files import read_json, resolve_model_dir

__all__ = ["AltCLIPTextConfig", "AltCLIPVisionConfig", "AltCLIPConfig", "ACTIVATIONS"]

# transformers' AltCLIPVisionConfig defaults that differ from BAAI/AltCLIP (ViT-B/32 vs ViT-L/14).
_TRANSFORMERS_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 32,
    "projection_dim": 512,
}


def _check_type(where: str, name: str, value: Any, kind: type) -> None:
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}{name} must be {kind.__name__}, got {value!r}")


class _SubConfig:
    """Shared behaviour of the tower configs: typed fields, validation, dict round trip."""

    model_type: ClassVar[str]
    _positive: ClassVar[tuple[str, ...]]
    _where: ClassVar[str]

    def __post_init__(self) -> None:
        where = self._where
        for f in dataclasses.fields(self):
            _check_type(where, f.name, getattr(self, f.name), {"int": int, "float": float, "str": str}[f.type])
        for name in self._positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"{where}hidden_size ({self.hidden_size}) must be divisible by "
                f"{where}num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{where}hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"{where}layer_norm_eps must be positive, got {self.layer_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any], defaults: dict[str, Any] | None = None):
        """Build from a config.json section. Unknown keys (dropout rates, initializer settings,
        transformers bookkeeping) are ignored; missing keys take ``defaults``, then the class default."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls._where.rstrip('.')} must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"{cls._where}model_type must be {cls.model_type!r}, got {model_type!r}")
        values = dict(defaults or {})
        names = {f.name for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in data.items() if k in names})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}


@dataclass
class AltCLIPTextConfig(_SubConfig):
    """The XLM-R text tower. Defaults: XLM-R large as in BAAI/AltCLIP."""

    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    project_dim: int = 768
    position_embedding_type: str = "absolute"

    model_type: ClassVar[str] = "altclip_text_model"
    _where: ClassVar[str] = "text_config."
    _positive: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "type_vocab_size", "project_dim",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.position_embedding_type != "absolute":
            # AltCLIP only ever ships absolute positions; relative ones change the attention math.
            raise ConfigError(
                f"text_config.position_embedding_type must be 'absolute', got {self.position_embedding_type!r}"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"text_config.pad_token_id ({self.pad_token_id}) must be in [0, vocab_size)")
        if self.max_position_embeddings <= self.pad_token_id + 1:
            # RoBERTa positions start at pad_token_id + 1, so fewer slots leave no room for a token.
            raise ConfigError(
                f"text_config.max_position_embeddings ({self.max_position_embeddings}) must exceed "
                f"pad_token_id + 1 ({self.pad_token_id + 1})"
            )

    @property
    def max_text_length(self) -> int:
        """The longest sequence the position table can embed (positions count from pad_token_id + 1)."""
        return self.max_position_embeddings - self.pad_token_id - 1


@dataclass
class AltCLIPVisionConfig(_SubConfig):
    """The CLIP ViT vision tower. Defaults: ViT-L/14 at 224 px as in BAAI/AltCLIP."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    model_type: ClassVar[str] = "altclip_vision_model"
    _where: ClassVar[str] = "vision_config."
    _positive: ClassVar[tuple[str, ...]] = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
        "image_size", "patch_size", "projection_dim",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size > self.image_size:
            raise ConfigError(
                f"vision_config.patch_size ({self.patch_size}) must not exceed "
                f"vision_config.image_size ({self.image_size})"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], defaults: dict[str, Any] | None = None):
        return super().from_dict(data, _TRANSFORMERS_VISION_DEFAULTS if defaults is None else defaults)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens per image: one per patch plus the class token (257 for ViT-L/14 at 224 px)."""
        return self.num_patches + 1


def _coerce(value, cls):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls.from_dict(value, defaults={})
    raise ConfigError(f"{cls._where.rstrip('.')} must be a {cls.__name__} or a dict, got {type(value).__name__}")


@dataclass
class AltCLIPConfig:
    """Both towers plus the shared projection. ``AltCLIPConfig()`` is BAAI/AltCLIP."""

    text_config: AltCLIPTextConfig = field(default_factory=AltCLIPTextConfig)
    vision_config: AltCLIPVisionConfig = field(default_factory=AltCLIPVisionConfig)
    projection_dim: int = 768
    logit_scale_init_value: float = 2.6592

    model_type: ClassVar[str] = "altclip"

    def __post_init__(self) -> None:
        # Plain dicts here mean "these fields, BAAI/AltCLIP defaults for the rest".
        self.text_config = _coerce(self.text_config, AltCLIPTextConfig)
        self.vision_config = _coerce(self.vision_config, AltCLIPVisionConfig)
        _check_type("", "projection_dim", self.projection_dim, int)
        _check_type("", "logit_scale_init_value", self.logit_scale_init_value, float)
        if self.projection_dim <= 0:
            raise ConfigError(f"projection_dim must be positive, got {self.projection_dim}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AltCLIPConfig":
        """Read a transformers AltCLIP ``config.json`` dict (see the module docstring on defaults)."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        if "model_type" not in data:
            raise ConfigError("config is missing the required field 'model_type' (expected 'altclip')")
        if is_flagai_config(data):
            # FlagAI's own AltCLIPConfig (a CLIPConfig; AltCLIP-m9's model card loads it through FlagAI)
            # names the model and its sections after CLIP and XLM-R. The fields and the weights are
            # AltCLIP's, and transformers reads such a file as AltCLIP (with a warning): so do we.
            data = dict(data, model_type=cls.model_type)
            for name, sub in (("text_config", AltCLIPTextConfig), ("vision_config", AltCLIPVisionConfig)):
                for key in (name, f"{name}_dict"):
                    if isinstance(data.get(key), dict):
                        data[key] = dict(data[key], model_type=sub.model_type)
        if data["model_type"] != cls.model_type:
            raise ConfigError(f"model_type must be 'altclip', got {data['model_type']!r}")
        sections = {}
        for name, sub in (("text_config", AltCLIPTextConfig), ("vision_config", AltCLIPVisionConfig)):
            section = data.get(name)
            # Old AltCLIP files may carry `<name>_dict`; transformers lets it override the section.
            override = data.get(f"{name}_dict")
            if section is None and override is None:
                raise ConfigError(f"config is missing the required field {name!r}")
            for key, value in ((name, section), (f"{name}_dict", override)):
                if value is not None and not isinstance(value, dict):
                    raise ConfigError(f"config field {key!r} must be a JSON object, got {type(value).__name__}")
            # transformers expands `<name>_dict` with its own defaults and then lets every field of that
            # expansion replace the section's: with a `_dict`, the section's values no longer count.
            sections[name] = sub.from_dict(section if override is None else override)
        kwargs = {k: data[k] for k in ("projection_dim", "logit_scale_init_value") if k in data}
        return cls(**sections, **kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "AltCLIPConfig":
        return cls.from_dict(read_config_json(path))

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike) -> "AltCLIPConfig":
        """Read ``config.json`` from a local directory or a Hugging Face Hub id."""
        return cls.from_json_file(Path(resolve_model_dir(path_or_id)) / "config.json")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "text_config": self.text_config.to_dict(),
            "vision_config": self.vision_config.to_dict(),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        }


def is_flagai_config(data: Any) -> bool:
    """A config.json written by FlagAI's AltCLIPConfig: model_type ``clip`` with an ``xlm-roberta`` text tower."""
    text = data.get("text_config") if isinstance(data, dict) else None
    return data.get("model_type") == "clip" and isinstance(text, dict) and text.get("model_type") == "xlm-roberta"


def read_config_json(path: str | os.PathLike) -> Any:
    """The contents of a ``config.json``; a missing or malformed file is a ConfigError naming it."""
    data = read_json(path, error=ConfigError, missing=None, what="a JSON object")
    if data is None:
        raise ConfigError(f"{path} not found: a model directory needs a config.json")
    return data
