"""The AltCLIP text tokenizer: XLM-R's ``tokenizer.json`` run by the ``tokenizers`` library.

The file is used as written (normaliser, pre-tokeniser, model, post-processor), as transformers 4's
``XLMRobertaTokenizerFast`` does. On top of it: the XLM-R template ``<s> ... </s>`` when the file
has no post-processor, right padding with ``<pad>`` (id 1) to the longest text, and truncation to
the smaller of the tokenizer's ``model_max_length`` and what the text tower's position table can
embed (``max_position_embeddings - pad_token_id - 1``: 512 for BAAI/AltCLIP).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, processors

from ..errors import AltCLIPError
from ..model_files import read_json

__all__ = ["AltCLIPTokenizer"]

# tokenizer_config.json writes "no limit" as a huge float (transformers' VERY_LARGE_INTEGER).
_NO_LIMIT = 10**20


def _token_text(value) -> str | None:
    """A special token as tokenizer_config / special_tokens_map store it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class AltCLIPTokenizer:
    """Encodes text batches into ``input_ids`` / ``attention_mask`` like transformers' XLM-R tokenizer."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
        model_max_length: int | None = 512,
        max_text_length: int | None = None,
    ):
        self._tokenizer = copy.deepcopy(tokenizer)  # we set padding/truncation on it per call
        self.pad_token = pad_token
        self.pad_token_id = self._id(pad_token)
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        if self._tokenizer.post_processor is None:
            self._tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos_token} $A {eos_token}",
                pair=f"{bos_token} $A {eos_token} {eos_token} $B {eos_token}",
                special_tokens=[(bos_token, self.bos_token_id), (eos_token, self.eos_token_id)],
            )
        self.model_max_length = model_max_length if model_max_length and model_max_length < _NO_LIMIT else None
        self.max_text_length = max_text_length
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def _id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise AltCLIPError(f"tokenizer has no token {token!r}")
        return token_id

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike) -> "AltCLIPTokenizer":
        """Read ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and, for the
        position limit, ``config.json`` from a model directory or hub id."""
        from ..model_files import resolve_model_dir

        directory = Path(resolve_model_dir(path_or_id))
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise AltCLIPError(f"{directory} has no tokenizer.json (needed to encode text)")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises a bare Exception for every parse error
            raise AltCLIPError(f"{tokenizer_file} could not be read ({str(exc).strip()[:200]})") from None
        settings = read_json(directory / "tokenizer_config.json", missing={})
        # special_tokens_map.json is the older place for the same names; tokenizer_config wins.
        specials = {**read_json(directory / "special_tokens_map.json", missing={}), **settings}
        return cls(
            tokenizer,
            bos_token=_token_text(specials.get("bos_token")) or "<s>",
            eos_token=_token_text(specials.get("eos_token")) or "</s>",
            pad_token=_token_text(specials.get("pad_token")) or "<pad>",
            model_max_length=int(settings.get("model_max_length") or _NO_LIMIT),
            max_text_length=_position_limit(directory),
        )

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def longest_piece(self) -> int:
        """Characters in the longest vocabulary entry (added tokens included)."""
        if not hasattr(self, "_longest_piece"):
            self._longest_piece = max(len(piece) for piece in self._tokenizer.get_vocab(with_added_tokens=True))
        return self._longest_piece

    def normalize(self, text: str) -> str:
        """``text`` as the tokenizer's normaliser leaves it (unchanged when it has none)."""
        normalizer = self._tokenizer.normalizer
        return text if normalizer is None else normalizer.normalize_str(text)

    def limit(self, max_length: int | None = None) -> int | None:
        """The longest sequence, special tokens included, that truncation cuts to."""
        limits = [n for n in (max_length, self.model_max_length, self.max_text_length) if n]
        return min(limits) if limits else None

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> dict:
        """``{"input_ids", "attention_mask"}`` for one text or a list of texts.

        ``padding``: True / "longest" pads to the longest text, "max_length" to ``max_length`` (or the
        limit), False / "do_not_pad" not at all. ``truncation`` cuts to ``max_length``, never beyond
        what the model's positions can embed.
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text is empty: give at least one string")
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"text must be a string or a list of strings, got an item of type {bad[0]}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must leave room for <s> and </s>: got {max_length}")

        limit = self.limit(max_length)
        tok = self._tokenizer
        if truncation and limit is not None:
            tok.enable_truncation(max_length=limit, strategy="longest_first", direction="right")
        else:
            tok.no_truncation()
        if padding in (True, "longest"):
            tok.enable_padding(pad_id=self.pad_token_id, pad_token=self.pad_token, direction="right")
        elif padding == "max_length":
            if limit is None:
                raise ValueError("padding='max_length' needs max_length")
            tok.enable_padding(pad_id=self.pad_token_id, pad_token=self.pad_token, length=limit)
        elif padding in (False, "do_not_pad"):
            tok.no_padding()
        else:
            raise ValueError(f"padding must be True, 'longest', 'max_length' or False, got {padding!r}")

        encodings = tok.encode_batch(texts)
        ids = [e.ids for e in encodings]
        mask = [e.attention_mask for e in encodings]
        longest = max(len(i) for i in ids)
        if self.max_text_length is not None and longest > self.max_text_length:
            raise ValueError(
                f"a text has {longest} tokens but the model embeds at most {self.max_text_length}; "
                "pass truncation=True"
            )
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": mask}
        if len({len(i) for i in ids}) > 1:
            raise ValueError("texts have different lengths: pass padding=True to return tensors")
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}
        if return_tensors == "np":
            import numpy as np

            return {"input_ids": np.array(ids, dtype=np.int64), "attention_mask": np.array(mask, dtype=np.int64)}
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _position_limit(directory: Path) -> int | None:
    """``max_position_embeddings - pad_token_id - 1`` from config.json, or None without one."""
    if not (directory / "config.json").is_file():
        return None
    from ..modeling.config import AltCLIPConfig

    return AltCLIPConfig.from_pretrained(directory).text_config.max_text_length
