"""Model directories and images for processor and CLI tests, built locally (no hub downloads).

- ``write_tokenizer_files(dir)``: an XLM-R-style ``tokenizer.json`` (Unigram, ``<s>``=0, ``<pad>``=1,
  ``</s>``=2, ``<unk>``=3, ``<mask>`` last) with ``tokenizer_config.json`` and ``special_tokens_map.json``
  as BAAI/AltCLIP ships them. ``style="xlmr-v5"`` uses the pipeline transformers 5 rebuilds for
  XLM-R (no normaliser, WhitespaceSplit + Metaspace), so both transformers loaders agree with the
  file; ``style="nfkc"`` adds an NFKC normaliser and a bare Metaspace, read as written only by
  ``XLMRobertaTokenizerFast(tokenizer_file=...)``.
- ``write_preprocessor_config(dir, ...)``: CLIPImageProcessor fields, in the dict or the bare-int form.
- ``make_model_dir(dir, ...)``: a random tiny checkpoint (``tests/checkpoints.py``) plus all of the above.
- ``photo_like(w, h)``: smooth gradients, shapes and fine texture rather than uniform noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Words the Unigram vocabulary holds whole; other text falls back to characters, then <unk>.
_WORDS = (
    "a photo of the cat dog black white red car house tree on in un chat noir chien ein foto einer "
    "katze hund фото собаки кошка صورة قطة كلب 一只 猫 的 照片 狗 犬 の 写真 です 고양이 사진 강아지"
).split()
_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-éèàüöäç"
    "一二三猫狗的照片只犬の写真ですこんにちは世界你好🐱🐶😀❤👍🏽"
)

MULTILINGUAL_TEXTS = [
    "a photo of a cat",
    "",
    "一只猫的照片",
    "صورة قطة على شجرة",
    "Ein Foto einer Katze 🐱 und ein Hund 🐶",
    "фото собаки, 犬の写真です and a car!",
    "  leading and   repeated   spaces\tand\ttabs\n",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and ligature ﬁ",
    "zwj family 👨‍👩‍👧 and skin tone 👍🏽 and unknown 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<mask> inside <s> a text </s>",
    "long " * 700 + "end",
]


def _vocab() -> list[tuple[str, float]]:
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {t for t, _ in vocab}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    add("▁", -2.0)
    for word in _WORDS:
        add("▁" + word, -3.0 - 0.1 * len(word))
    for word in _WORDS:
        for i in range(1, len(word)):
            add(word[i:], -6.0 - 0.2 * (len(word) - i))
    for ch in sorted(set("".join(_WORDS)) | set(_CHARS)):
        add(ch, -8.0)
        add("▁" + ch, -8.5)
    return vocab


def tokenizer_vocab_size() -> int:
    """Ids the test tokenizer can emit: its pieces plus ``<mask>``."""
    return len(_vocab()) + 1


def write_tokenizer_files(directory: str | Path, *, style: str = "xlmr-v5", model_max_length: int = 512) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram(_vocab(), unk_id=3, byte_fallback=False))
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    if style == "xlmr-v5":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), metaspace])
    elif style == "nfkc":
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
        tok.pre_tokenizer = metaspace
    else:
        raise ValueError(style)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "<pad>", "</s>", "<unk>")])
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    assert tok.token_to_id("<mask>") == tok.get_vocab_size() - 1
    tok.save(str(directory / "tokenizer.json"))

    mask = {"content": "<mask>", "lstrip": True, "normalized": False, "rstrip": False, "single_word": False}
    specials = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": mask,
                "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {**specials, "model_max_length": model_max_length, "tokenizer_class": "XLMRobertaTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_preprocessor_config(
    directory: str | Path, *, shortest_edge: int = 30, crop: int = 30, bare_ints: bool = False,
    mean=CLIP_MEAN, std=CLIP_STD,
) -> Path:
    """BAAI/AltCLIP's file has the older bare-int ``size``/``crop_size``; transformers 5 writes dicts."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "do_resize": True,
        "size": shortest_edge if bare_ints else {"shortest_edge": shortest_edge},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": crop if bare_ints else {"height": crop, "width": crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "AltCLIPProcessor",
    }
    if bare_ints:
        config["feature_extractor_type"] = "CLIPFeatureExtractor"
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    return directory


def make_model_dir(directory: str | Path, *, max_position_embeddings: int = 40, image_size: int = 30, seed: int = 0) -> Path:
    """A complete tiny AltCLIP directory: weights, config, tokenizer and preprocessor files."""
    from tests.checkpoints import random_hf_model, save_hf, tiny_config

    config = tiny_config(
        vocab_size=tokenizer_vocab_size(), max_position_embeddings=max_position_embeddings, image_size=image_size
    )
    save_hf(random_hf_model(config, seed=seed), directory)
    write_tokenizer_files(directory)
    write_preprocessor_config(directory, shortest_edge=image_size, crop=image_size)
    return Path(directory)


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with the structure of a photo: gradients, an object with edges, fine texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    sky = np.stack([0.3 + 0.5 * y, 0.5 + 0.3 * y, 0.9 - 0.2 * y], axis=-1)
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.7), rng.uniform(0.15, 0.3)
    disk = ((x - cx) ** 2 + (y - cy) ** 2 < r**2)[..., None]
    colour = rng.uniform(0.1, 0.9, 3)
    shade = 0.7 + 0.3 * np.cos(8 * x + 3 * y)[..., None]
    image = np.where(disk, colour * shade, sky)
    image[y > 0.8] = [0.25, 0.45, 0.15]  # a horizon line: a hard edge across the image
    image += 0.04 * np.sin(40 * x + 25 * y)[..., None] + 0.03 * rng.standard_normal(image.shape)
    return Image.fromarray(np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def with_exif_orientation(image: Image.Image, path: str | Path, orientation: int = 6) -> Path:
    """Save as a JPEG whose EXIF says to rotate it (6: rotate 90 degrees clockwise to display)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", quality=95, exif=exif)
    return Path(path)


def mode_variants(base: Image.Image) -> dict[str, Image.Image]:
    """The same picture in every mode the processor must handle."""
    rgba = base.convert("RGBA")
    alpha = np.asarray(base.convert("L"), dtype=np.uint8)
    rgba.putalpha(Image.fromarray(np.where(alpha > 128, 255, alpha // 2).astype(np.uint8)))
    la = base.convert("LA")
    la.putalpha(rgba.getchannel("A"))
    p_plain = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    p_transparent = p_plain.copy()
    p_transparent.info["transparency"] = 0
    wide = (np.asarray(base.convert("L"), dtype=np.uint16) * 257 + 100).astype(np.uint16)
    i16 = Image.fromarray(wide)
    return {
        "RGB": base,
        "RGBA": rgba,
        "LA": la,
        "P": p_plain,
        "P+transparency": p_transparent,
        "L": base.convert("L"),
        "I;16": i16,
        "CMYK": base.convert("CMYK"),
    }
