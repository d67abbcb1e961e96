"""``TextTokens``: long texts cut before tokenizing give exactly the ids of tokenizing them whole and
truncating (the processor's own tokenization), on two tokenizer styles (no normaliser; NFKC with
space-run collapsing) and on a vocabulary built so that the first token depends on the whole text."""

from __future__ import annotations

import copy
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from altclip_fast.apps.serve.tokens import CHARS_PER_TOKEN, TextTokens
from altclip_fast.preprocessing.tokenization import AltCLIPTokenizer
from tests.altclip_fast.processor_fixtures import write_tokenizer_files

# Pieces of text the cuts land in: words the vocabulary knows and words it does not, CJK without
# spaces, emoji (ZWJ sequences, skin tones, flags), combining marks, what NFKC rewrites (full width,
# ligatures), special tokens written as text, the metaspace character itself, and whitespace runs.
FRAGMENTS = ["a photo of a cat", "dog", "the", "Katze", "xyzzyq", "一只猫的照片", "你好世界" * 5, "こんにちは",
             "🐱", "👨‍👩‍👧", "👍🏽", "🇨🇳", "e\u0301", "\u0301\u0301", "ＦＵＬＬ", "ﬁ", "<mask>", "<s>", "</s>",
             "▁", "\u3000", "  ", " " * 40, "\t", "\n\n", "\r\n", "é", "𝔘𝔫𝔦", "\u200b", "\u00ad", "...", "-", "'"]


def random_text(rng: random.Random, length: int) -> str:
    parts, size = [], 0
    while size < length:
        part = rng.choice(FRAGMENTS)
        parts.append(part + (" " if rng.random() < 0.6 else ""))
        size += len(parts[-1])
    return "".join(parts)


@pytest.fixture(scope="module", params=["xlmr-v5", "nfkc"])
def tokenizer(request, tmp_path_factory):
    directory = write_tokenizer_files(tmp_path_factory.mktemp(request.param), style=request.param)
    from tokenizers import Tokenizer

    return AltCLIPTokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")), model_max_length=512,
                            max_text_length=37)


def whole(tokenizer, texts):
    return tokenizer(texts, padding=False, truncation=True, return_tensors=None)["input_ids"]


def long_texts():
    rng = random.Random(22)
    texts = [random_text(rng, rng.randrange(300, 3000)) for _ in range(300)]
    texts += [
        "猫的照片" * 2000,  # CJK, no space for 8000 characters
        "a" + " " * 50000 + "b c d",  # a whitespace run far longer than the cut
        "\u200b" * 5000 + "a photo of a cat " * 40,  # characters the NFKC normaliser drops
        "🐱" * 3000, "👨‍👩‍👧" * 1000, "e\u0301" * 3000, "\u0301" * 5000,  # emoji, combining marks
        "ﬁ" * 3000, "ＦＵＬＬ" * 1000,  # one character normalising to two; full width
        "x" * 10000,  # one long unknown word
        "the cat " * 1000 + "xyzzy" * 10,
        "the\ncat\t" * 1000, "the \u3000cat\u00a0" * 1000, "the\r\ncat " * 1000,  # other whitespace
    ]
    for length in range(290, 330):  # the first cut point, CHARS_PER_TOKEN * 37, inside every kind of piece
        texts.append(random_text(random.Random(length), 4000)[:length] + "tail end words " * 10)
    return texts


def test_long_texts_get_the_ids_of_tokenizing_them_whole(tokenizer):
    tokens, texts = TextTokens(tokenizer), long_texts()
    assert tokens(texts) == whole(tokenizer, texts)
    assert all(len(ids) == 37 for ids in tokens(texts[:300]))  # they do fill the limit: the cut was used


def test_a_huge_text_is_not_tokenized_whole(tokenizer):
    seen = []

    class Spy(TextTokens):
        def encode(self, texts):
            seen.extend(len(t) for t in texts)
            return super().encode(texts)

    for text in ("a photo of a cat " * 60000, "猫的照片" * 250000):  # 1M characters
        seen.clear()
        assert Spy(tokenizer)([text]) == whole(tokenizer, [text])
        assert max(seen) <= 4 * CHARS_PER_TOKEN * 37, max(seen)


def test_a_first_token_that_depends_on_the_whole_text_falls_back_to_tokenizing_it_whole():
    """Unigram with "▁"/"▁a" and "aa": "aaa...a" starts with "▁a" when its length is odd and "▁" when
    even, so no head of it can be trusted; the run check sees the cuts disagree."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), ("▁a", -1.5), ("a", -10.0),
             ("aa", -1.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer = AltCLIPTokenizer(tok, model_max_length=512, max_text_length=12)
    texts = ["a" * n for n in (3000, 3001, 50000, 50001)]
    assert [ids[1] for ids in whole(tokenizer, texts)] == [4, 5, 4, 5]
    seen = []

    class Spy(TextTokens):
        def encode(self, texts):
            seen.extend(len(t) for t in texts)
            return super().encode(texts)

    for text in texts:
        seen.clear()
        assert Spy(tokenizer)([text]) == whole(tokenizer, [text])
        assert sum(seen) <= 3 * len(text), (len(text), sum(seen))  # the checks cost less than the whole


def test_token_arrays_get_the_special_tokens_and_the_same_truncation(tokenizer):
    tokens = TextTokens(tokenizer)
    texts = ["a photo of a cat", "the cat " * 100]
    short = whole(tokenizer, texts[:1])[0]
    assert tokens([short[1:-1]]) == [short]
    unlimited = copy.deepcopy(tokenizer)
    unlimited.model_max_length = unlimited.max_text_length = None
    long_ids = whole(unlimited, texts[1:])[0][1:-1]  # the whole text's ids, untruncated
    assert len(long_ids) > 37
    assert tokens([long_ids, "a photo of a cat"]) == whole(tokenizer, [texts[1], texts[0]])


class BlockingTokenizer:
    """A tokenizer whose calls on a text starting with "slow" wait for ``release``; copies share it."""

    def __init__(self, real, release: threading.Event):
        self.real, self.release = real, release

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __deepcopy__(self, memo):
        return BlockingTokenizer(copy.deepcopy(self.real, memo), self.release)

    def __call__(self, texts, **kwargs):
        if texts[0].startswith("slow"):
            self.release.wait(10)
        return self.real(texts, **kwargs)


def test_tokenizing_one_request_does_not_hold_up_another(tokenizer):
    import torch

    from altclip_fast.apps.serve.model import ServedModel

    release = threading.Event()
    config = SimpleNamespace(projection_dim=8, text_config=SimpleNamespace(vocab_size=tokenizer.vocab_size))
    model = SimpleNamespace(config=config, logit_scale=torch.tensor(1.0))
    processor = SimpleNamespace(tokenizer=BlockingTokenizer(tokenizer, release))
    served = ServedModel(model, processor, device=torch.device("cpu"), dtype=torch.float32)
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(served.tokenize, ["slow text"])
        quick = pool.submit(served.tokenize, ["quick"])
        try:
            assert quick.result(timeout=5) == whole(tokenizer, ["quick"])
        finally:
            release.set()
        assert slow.result(timeout=10) == whole(tokenizer, ["slow text"])
    assert np.array_equal(served.vocab_size, tokenizer.vocab_size)
