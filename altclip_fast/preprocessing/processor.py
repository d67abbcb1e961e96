"""``AltCLIPProcessor``: text and images to model inputs, as transformers' ``AltCLIPProcessor`` does.

The text half is ``tokenization.AltCLIPTokenizer`` and the image half is
``image_processing.AltCLIPImageProcessor``; their module docs say where and why they differ from
transformers (EXIF orientation, transparency of files passed by path, 16-bit grayscale, and the
opt-in ``fast_decode``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .image_processing import AltCLIPImageProcessor, ImageInput, ImageLoadError
from .tokenization import AltCLIPTokenizer

__all__ = ["AltCLIPProcessor", "AltCLIPTokenizer", "AltCLIPImageProcessor", "ImageLoadError", "ProcessorOutput"]


class ProcessorOutput(dict):
    """A dict of model inputs that also allows ``out.input_ids`` and ``out.to(device)``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device=None, dtype=None) -> "ProcessorOutput":
        """Move tensors to ``device``; ``dtype`` applies to floating tensors (pixel_values) only."""
        out = ProcessorOutput()
        for key, value in self.items():
            if hasattr(value, "to"):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            out[key] = value
        return out


class AltCLIPProcessor:
    """``processor(text=..., images=...)`` -> ``input_ids``, ``attention_mask``, ``pixel_values``."""

    def __init__(self, tokenizer: AltCLIPTokenizer | None = None, image_processor: AltCLIPImageProcessor | None = None):
        if tokenizer is None and image_processor is None:
            raise ValueError("AltCLIPProcessor needs a tokenizer, an image processor, or both")
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike, *, exif_transpose: bool = True, fast_decode: bool = False,
        image_size: int | None = None,
    ) -> "AltCLIPProcessor":
        """Read the tokenizer and preprocessor files of a model directory or hub id. ``exif_transpose``
        and ``fast_decode`` are ``AltCLIPImageProcessor`` options (see its module doc). ``image_size``
        replaces the file's resize and crop: shortest edge to ``image_size``, then a centre crop of
        ``image_size`` x ``image_size`` (run the model with ``interpolate_pos_encoding=True``)."""
        from ..model_files import resolve_model_dir

        directory = Path(resolve_model_dir(path_or_id))
        options = dict(exif_transpose=exif_transpose, fast_decode=fast_decode)
        if image_size is not None:
            options["image_size"] = image_size
        return cls(AltCLIPTokenizer.from_pretrained(directory), AltCLIPImageProcessor.from_pretrained(directory, **options))

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: ImageInput | Sequence[ImageInput] | None = None,
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> ProcessorOutput:
        if text is None and images is None:
            raise ValueError("give text, images, or both")
        out = ProcessorOutput()
        if text is not None:
            if self.tokenizer is None:
                raise ValueError("this processor has no tokenizer")
            out.update(self.tokenizer(text, padding=padding, truncation=truncation, max_length=max_length,
                                      return_tensors=return_tensors))
        if images is not None:
            if self.image_processor is None:
                raise ValueError("this processor has no image processor")
            out.update(self.image_processor(images, return_tensors=return_tensors))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tokenizer={self.tokenizer!r}, image_processor={self.image_processor!r})"
