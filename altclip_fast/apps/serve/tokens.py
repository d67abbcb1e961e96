"""Token ids for the served model, made in the prep threads without a lock and without tokenizing more
of a long text than its first tokens need.

``TextTokens`` gives each thread its own copy of the tokenizer (the tokenizers object is reconfigured
on every call, so one shared copy needed a global lock, and one 1M-character text held up every other
request). A text longer than ``CHARS_PER_TOKEN`` characters per token of the model's limit is cut
before it is tokenized, at a point where cutting provably changes none of the tokens before it, and
only if the cut text still fills the token budget; the ids are then those of tokenizing the whole text
and truncating it (``tests/.../test_tokens.py`` checks that on cuts inside words, CJK, emoji,
combining marks and whitespace runs). The argument, for a tokenizer that normalises character by
character (or grapheme by grapheme), splits words at spaces and segments each word on its own
(XLM-R's sentencepiece: Precompiled/NFKC normaliser, Metaspace, Unigram):

- **At a space.** Cut just before whitespace that normalises to a space and follows a character whose
  normal form ends in no whitespace, where normalising across the cut equals normalising both sides
  alone: the words before the cut are the whole text's words, so their tokens are the whole text's
  first tokens.
- **Inside a long word** (CJK has no spaces). Unigram's Viterbi pass decides the best segmentation
  ending at each position from the characters before it alone, so wherever the whole text's
  segmentation has a token boundary, the tokens before it are those of the text cut there. No token
  is longer than the longest vocabulary entry (``L`` characters), so among ``L`` consecutive
  positions inside a word the whole text's segmentation has a boundary. Cutting at each of ``L``
  consecutive positions whose characters normalise one to one and independently, and finding the
  same first tokens every time, certifies them.

Anything else is tokenized whole, as before: slower, never wrong. Checking a window costs ``L``
tokenizations of the head, so it is tried only while that costs less than tokenizing the whole text:
whatever the text, the work is at most about three times tokenizing it whole, and a text that
tokenizes well is done after a few thousand characters.
Token arrays from the client are the model's ids without ``<s>``/``</s>``; they get those and the same
truncation.
"""

from __future__ import annotations

import copy
import threading

__all__ = ["CHARS_PER_TOKEN", "SCAN_CHARS", "TextTokens"]

# The first cut is tried this many characters per token of the limit in: a token covers at least one
# character, and text needing more than 8 characters a token (long whitespace runs, characters the
# normaliser drops) gets a cut 4x further on, up to the whole text.
CHARS_PER_TOKEN = 8
# How far past a cut point a certified cut is looked for before trying 4x further on.
SCAN_CHARS = 512


class TextTokens:
    """``TextTokens(tokenizer)(items)``: token ids for texts (str) and token arrays (lists of ints)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.limit = tokenizer, tokenizer.limit()
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.window = tokenizer.longest_piece
        self._local = threading.local()

    def _own(self):
        """This thread's copy of the tokenizer."""
        mine = getattr(self._local, "tokenizer", None)
        if mine is None:
            mine = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return mine

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Today's tokenization: each text whole, truncated to the limit."""
        return self._own()(texts, padding=False, truncation=True, return_tensors=None)["input_ids"]

    def __call__(self, items: list) -> list[list[int]]:
        out: list = [None] * len(items)
        short = [i for i, item in enumerate(items) if isinstance(item, str) and not self._long(item)]
        for i, ids in zip(short, self.encode([items[i] for i in short]) if short else []):
            out[i] = ids
        for i, item in enumerate(items):
            if out[i] is None:
                out[i] = self._wrap(item) if isinstance(item, list) else self.head(item)
        return out

    def _long(self, text: str) -> bool:
        return self.limit is not None and len(text) > CHARS_PER_TOKEN * self.limit

    def _wrap(self, ids: list[int]) -> list[int]:
        room = len(ids) if self.limit is None else self.limit - 2
        return [self.bos, *ids[:room], self.eos]

    def head(self, text: str) -> list[int]:
        """``encode([text])[0]``, tokenizing only a certified head of ``text`` where one fills the limit."""
        cut = CHARS_PER_TOKEN * (self.limit or 0)
        while 0 < cut < len(text):
            ids = self._certified(text, cut)
            if ids is not None:
                return ids
            cut *= 4
        return self.encode([text])[0]

    def _certified(self, text: str, start: int) -> list[int] | None:
        """The ids of a head of ``text`` cut at or after ``start`` (see the module doc), if one is found
        within ``SCAN_CHARS`` and fills the limit."""
        end = min(len(text) - 1, start + SCAN_CHARS)
        run = 0  # consecutive one-to-one characters ending at j - 1, each independent of the one before
        for j in range(start, end):
            if text[j].isspace() and self._space_cut(text, j):
                ids = self.encode([text[:j]])[0]
                return ids if len(ids) == self.limit else None
            run = run + 1 if self._one_to_one(text, j) else 0
            if run > self.window and self.window * j > len(text):
                return None  # the window's prefixes would cost more than the whole text
            if run > self.window:  # text[j - window .. j] one to one: cut before each of the last window
                cuts = self.encode([text[:k] for k in range(j - self.window + 1, j + 1)])
                if len(cuts[0]) == self.limit and all(ids == cuts[0] for ids in cuts):
                    return cuts[0]
                return None
        return None

    def _space_cut(self, text: str, j: int) -> bool:
        """Cutting before the whitespace at ``j`` leaves the words before it as they are in the whole text:
        it normalises to a space (a word boundary for Metaspace and WhitespaceSplit alike), the character
        before it to something that ends in no space, and normalising across the cut changes nothing."""
        norm = self._own().normalize
        before, after = norm(text[j - 1]), norm(text[j: j + 2])
        return (bool(before) and not before[-1].isspace() and not text[j - 1].isspace() and text[j - 1] != "▁"
                and after.startswith(" ") and norm(text[j - 1: j + 2]) == before + after)

    def _one_to_one(self, text: str, j: int) -> bool:
        """``text[j]`` normalises to one character that is not a word boundary, and cutting before it
        changes nothing in the normal form of the pair ``text[j - 1: j + 1]``."""
        norm = self._own().normalize
        alone = norm(text[j])
        return (len(alone) == 1 and not alone.isspace() and alone != "▁" and not text[j].isspace()
                and norm(text[j - 1: j + 1]) == norm(text[j - 1]) + alone)
