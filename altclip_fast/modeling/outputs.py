"""Output containers shared by the reference and the fast model, so both return identical structures.

They behave like transformers' ``ModelOutput`` in the ways user code relies on: attribute access,
``out["name"]``, integer indexing and slicing over the fields that are not None (``out[0]``),
``to_tuple()``, ``keys()`` / ``values()`` / ``items()``, ``"name" in out`` and ``len(out)``, all
skipping None fields. They are plain dataclasses, not ``OrderedDict`` subclasses, so no transformers
import is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch

__all__ = [
    "ModelOutput",
    "BaseModelOutputWithPooling",
    "BaseModelOutputWithPoolingAndProjection",
    "AltCLIPOutput",
]


@dataclass
class ModelOutput:
    """Base of the output dataclasses: a read-mostly mapping over the fields that are set."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        # Like a dict (and transformers' ModelOutput): iteration yields the names of the set fields.
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    """A tower's output: per-token states ``[batch, seq, hidden]`` and the pooled ``[batch, hidden]``.

    ``hidden_states`` (when requested) holds the embeddings' output then every layer's output;
    ``attentions`` (when requested) holds every layer's ``[batch, heads, seq, seq]`` probabilities.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class BaseModelOutputWithPoolingAndProjection(ModelOutput):
    """The text tower's output. ``last_hidden_state`` is after ``pre_LN`` and ``transformation``
    (``[batch, seq, project_dim]``); ``pooler_output`` is its token 0."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class AltCLIPOutput(ModelOutput):
    """The dual-encoder output: logits, L2-normalised embeddings and both towers' outputs."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPoolingAndProjection | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        # As transformers' AltCLIPOutput does: the nested tower outputs become tuples too.
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())
