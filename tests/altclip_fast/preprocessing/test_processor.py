"""AltCLIPProcessor against transformers' processor on the same files.

Oracles: ``XLMRobertaTokenizer.from_pretrained`` (what ``transformers.AltCLIPProcessor`` loads) and
``XLMRobertaTokenizerFast(tokenizer_file=...)`` (the file as written) for text; the PIL image
processor (``CLIPImageProcessorPil`` in transformers 5, plain ``CLIPImageProcessor`` before the
torchvision split) for images. Pixel parity comes out exact; the bound asserted is the issue's 1e-5.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from altclip_fast.modeling.config import AltCLIPConfig
from altclip_fast.errors import AltCLIPError
from altclip_fast.preprocessing.image_processing import AltCLIPImageProcessor, ImageLoadError
from altclip_fast.preprocessing.processor import AltCLIPProcessor
from altclip_fast.preprocessing.tokenization import AltCLIPTokenizer
from tests.altclip_fast.processor_fixtures import (
    MULTILINGUAL_TEXTS,
    mode_variants,
    photo_like,
    tokenizer_vocab_size,
    with_exif_orientation,
    write_preprocessor_config,
    write_tokenizer_files,
)

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def _pil_image_processor_class():
    # transformers 5 split CLIPImageProcessor into a torchvision class and a "Pil" class; before
    # that, CLIPImageProcessor itself was the PIL one.
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _write_config(directory, max_position_embeddings):
    config = AltCLIPConfig(text_config=dict(vocab_size=tokenizer_vocab_size(), max_position_embeddings=max_position_embeddings))
    (directory / "config.json").write_text(json.dumps(config.to_dict()))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Tokenizer, preprocessor (shortest edge 32, crop 26) and a config with BAAI/AltCLIP's 514 positions."""
    directory = tmp_path_factory.mktemp("altclip_processor")
    write_tokenizer_files(directory)
    write_preprocessor_config(directory, shortest_edge=32, crop=26)
    _write_config(directory, 514)
    return directory


@pytest.fixture(scope="module")
def ours(model_dir):
    return AltCLIPProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def oracle_images(model_dir):
    return _pil_image_processor_class().from_pretrained(model_dir)


def _theirs(oracle, images, **kwargs):
    return oracle(images=images, return_tensors="pt", **kwargs)["pixel_values"]


def _max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------- text


def test_multilingual_ids_match_both_transformers_loaders(model_dir, ours):
    loaded = transformers.XLMRobertaTokenizer.from_pretrained(model_dir)
    from_file = transformers.XLMRobertaTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), model_max_length=512)
    got = ours(text=MULTILINGUAL_TEXTS)
    for oracle in (loaded, from_file):
        want = oracle(MULTILINGUAL_TEXTS, padding=True, truncation=True, return_tensors="pt")
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["attention_mask"], want["attention_mask"])
    ids, mask = got["input_ids"], got["attention_mask"]
    assert ids.dtype == torch.long and ids.shape == (len(MULTILINGUAL_TEXTS), 512)  # the long text sets the width
    assert ids[1, :2].tolist() == [0, 2] and mask[1].sum() == 2  # "" is <s> </s>
    assert (ids[mask == 0] == 1).all()  # right padding with <pad> = 1
    assert ids[-1, -1] == 2 and mask[-1].all()  # truncated text still ends with </s>
    assert (ids[0] == 3).sum() == 0 and (ids == 3).any()  # known words are not <unk>; unknown script is


def test_file_normalizer_is_honoured(tmp_path):
    """A tokenizer.json with its own normaliser (NFKC) is used as written, like XLMRobertaTokenizerFast."""
    write_tokenizer_files(tmp_path, style="nfkc")
    ours = AltCLIPTokenizer.from_pretrained(tmp_path)
    oracle = transformers.XLMRobertaTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), model_max_length=512)
    got = ours(MULTILINGUAL_TEXTS)
    want = oracle(MULTILINGUAL_TEXTS, padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    fullwidth = MULTILINGUAL_TEXTS.index("ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and ligature ﬁ")
    plain = ours("FULLWIDTH text and ligature fi")["input_ids"][0].tolist()
    assert got["input_ids"][fullwidth, : len(plain)].tolist() == plain
    assert got["attention_mask"][fullwidth].sum() == len(plain)


def test_truncation_never_exceeds_the_position_table(tmp_path):
    write_tokenizer_files(tmp_path)  # model_max_length 512, but the model only has 40 positions
    _write_config(tmp_path, 40)
    tok = AltCLIPTokenizer.from_pretrained(tmp_path)
    assert tok.max_text_length == 38  # 40 - pad_token_id (1) - 1
    long_text = "a photo of the cat " * 30
    out = tok([long_text, "cat"])
    assert out["input_ids"].shape == (2, 38) and out["input_ids"][0, -1] == 2
    assert tok([long_text], max_length=10)["input_ids"].shape == (1, 10)
    assert tok([long_text], max_length=1000)["input_ids"].shape == (1, 38)
    with pytest.raises(ValueError, match="at most 38"):
        tok([long_text], truncation=False)


def test_padding_modes_and_return_types(ours):
    tok = ours.tokenizer
    out = tok(["cat", "a photo of a dog"], padding="max_length", max_length=12)
    assert out["input_ids"].shape == (2, 12)
    lists = tok(["cat", "a photo of a dog"], padding=False, return_tensors=None)
    assert [len(x) for x in lists["input_ids"]] == [3, 7]
    assert tok("cat", return_tensors="np")["input_ids"].dtype == np.int64
    with pytest.raises(ValueError, match="padding=True"):
        tok(["cat", "a photo of a dog"], padding=False)
    with pytest.raises(TypeError):
        tok(["cat", 3])


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "width,height",
    [(26, 26), (32, 32), (47, 33), (33, 47), (300, 7), (7, 300), (1, 1), (500, 375), (31, 1000)],
)
def test_pixels_match_on_sizes_and_aspect_ratios(ours, oracle_images, width, height):
    photo = photo_like(width, height, seed=width * 7 + height)
    noise = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    got = ours(images=[photo, noise])["pixel_values"]
    assert got.shape == (2, 3, 26, 26) and got.dtype == torch.float32
    assert _max_diff(got, _theirs(oracle_images, [photo, noise])) <= ATOL


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "P+transparency", "L", "CMYK"])
def test_pixels_match_on_modes(ours, oracle_images, mode):
    image = mode_variants(photo_like(61, 45, seed=3))[mode]
    assert _max_diff(ours(images=image)["pixel_values"], _theirs(oracle_images, image)) <= ATOL


def test_transparency_is_composited_on_white(ours):
    clear = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # black under full transparency
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    assert _max_diff(ours(images=clear)["pixel_values"], ours(images=white)["pixel_values"]) == 0


def test_sixteen_bit_grayscale_is_scaled_not_clipped(ours, oracle_images):
    """Pillow (and so transformers) clips I;16 at 255; we scale 0..65535 to 0..255."""
    i16 = mode_variants(photo_like(50, 40, seed=5))["I;16"]
    wide = np.asarray(i16).astype(np.uint32)
    as_8_bit = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    got = ours(images=i16)["pixel_values"]
    assert _max_diff(got, _theirs(oracle_images, as_8_bit)) <= ATOL
    assert _max_diff(got, _theirs(oracle_images, i16)) > 0.5  # the clipped version really differs


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_paths_match_transformers_paths(ours, oracle_images, tmp_path, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    photo_like(70, 52, seed=11).save(path, format=fmt)
    got = ours(images=str(path))["pixel_values"]
    assert _max_diff(got, _theirs(oracle_images, str(path))) <= ATOL
    assert _max_diff(ours(images=path)["pixel_values"], got) == 0  # pathlib.Path is a path too


def test_exif_orientation(model_dir, ours, oracle_images, tmp_path):
    path = with_exif_orientation(photo_like(72, 40, seed=2), tmp_path / "rotated.jpg", orientation=6)
    stored = Image.open(path)
    assert stored.size == (72, 40)
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # orientation 6: turn 90 degrees clockwise
    got_path = ours(images=str(path))["pixel_values"]
    # Default: upright, from a path (as transformers does for paths) and from an opened image alike.
    assert _max_diff(got_path, _theirs(oracle_images, str(path))) <= ATOL
    assert _max_diff(got_path, _theirs(oracle_images, upright)) <= ATOL
    assert _max_diff(ours(images=Image.open(path))["pixel_values"], got_path) == 0
    assert _max_diff(got_path, _theirs(oracle_images, stored)) > 0.1  # the sideways picture differs
    # exif_transpose=False: transformers' behaviour for an already opened PIL image.
    raw = AltCLIPProcessor.from_pretrained(model_dir, exif_transpose=False)
    assert _max_diff(raw(images=Image.open(path))["pixel_values"], _theirs(oracle_images, stored)) <= ATOL


def test_transparent_file_same_as_opened_image(ours, oracle_images, tmp_path):
    """A path and the same file opened by the caller give the same pixels (transformers' path loader
    drops alpha before compositing; its PIL path composites on white, which we follow for both)."""
    image = mode_variants(photo_like(40, 50, seed=9))["RGBA"]
    path = tmp_path / "transparent.png"
    image.save(path)
    got = ours(images=str(path))["pixel_values"]
    assert _max_diff(got, _theirs(oracle_images, Image.open(path))) <= ATOL
    assert _max_diff(got, _theirs(oracle_images, str(path))) > 0.1


def test_fast_decode_trades_exactness_for_reduced_scale_jpeg_decoding(model_dir, ours, tmp_path):
    fast = AltCLIPProcessor.from_pretrained(model_dir, fast_decode=True)
    jpeg, png = tmp_path / "big.jpg", tmp_path / "big.png"
    photo_like(1200, 900, seed=12).save(jpeg, quality=92)
    photo_like(1200, 900, seed=12).save(png)
    decoded = fast.image_processor.load_rgb(jpeg)
    assert decoded.width < 1200 and min(decoded.size) >= 2 * 32  # reduced, but >= twice the resize target
    exact, approx = ours(images=str(jpeg))["pixel_values"], fast(images=str(jpeg))["pixel_values"]
    assert 0 < _max_diff(exact, approx) < 0.3 and (exact - approx).abs().mean() < 0.03
    assert _max_diff(fast(images=str(png))["pixel_values"], ours(images=str(png))["pixel_values"]) == 0


def _arrays():
    base = np.asarray(photo_like(41, 57, seed=4))
    rgba = np.concatenate([base, (base[..., :1] // 2 + 100)], axis=-1)
    return {
        "HWC uint8": (base, {}),
        "CHW uint8": (base.transpose(2, 0, 1).copy(), {}),
        "HW1 uint8": (base[..., :1].copy(), {}),
        "HWC RGBA uint8": (rgba, {}),
        "HWC float 0-255": (base.astype(np.float32), {}),
        "CHW float 0-1": (base.transpose(2, 0, 1) / 255.0, {"do_rescale": False}),
        "torch CHW float 0-1": (torch.from_numpy(base.transpose(2, 0, 1).copy()).float() / 255, {"do_rescale": False}),
        "torch HWC uint8": (torch.from_numpy(base.copy()), {}),
    }


@pytest.mark.parametrize("name", list(_arrays()))
def test_arrays_match_transformers_conventions(ours, oracle_images, name):
    array, oracle_kwargs = _arrays()[name]
    got = ours(images=array)["pixel_values"]
    assert _max_diff(got, _theirs(oracle_images, array, **oracle_kwargs)) <= ATOL


def test_arrays_more_than_transformers(ours):
    base = np.asarray(photo_like(30, 40, seed=6).convert("L"))
    two_d = ours(images=base)["pixel_values"]  # transformers rejects [H, W]; we read it as grayscale
    assert _max_diff(two_d, ours(images=base[..., None])["pixel_values"]) == 0
    half = torch.from_numpy(np.array(photo_like(30, 40, seed=6))).permute(2, 0, 1).to(torch.bfloat16) / 255
    assert ours(images=half)["pixel_values"].shape == (1, 3, 26, 26)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ours(images=np.full((20, 20, 3), 1.5, dtype=np.float32))
    with pytest.raises(ValueError, match="channel axis"):
        ours(images=np.zeros((20, 20, 7), dtype=np.uint8))


def test_torch_normalisation_is_bit_identical(ours):
    ip = ours.image_processor
    crops = np.random.default_rng(0).integers(0, 256, (3, 3, 26, 26), dtype=np.uint8)
    crops[0, :, 0, :4] = [[0], [255], [128]]  # both ends of the table on every channel
    assert torch.equal(ip.to_pixel_values_torch(torch.from_numpy(crops)), torch.from_numpy(ip.to_pixel_values(crops)))


def test_batch_of_mixed_inputs_equals_one_by_one(ours, tmp_path):
    path = tmp_path / "a.png"
    photo_like(50, 30, seed=1).save(path)
    items = [str(path), photo_like(30, 50, seed=2), np.asarray(photo_like(33, 33, seed=3))]
    batch = ours(images=items)["pixel_values"]
    assert batch.shape == (3, 3, 26, 26)
    for row, item in zip(batch, items):
        assert torch.equal(row, ours(images=item)["pixel_values"][0])


@pytest.mark.parametrize("bare_ints", [True, False])
def test_config_forms_and_small_images_padded(tmp_path, bare_ints):
    """BAAI/AltCLIP's preprocessor_config.json uses bare ints; a crop larger than the resize pads with zeros."""
    write_preprocessor_config(tmp_path, shortest_edge=20, crop=26, bare_ints=bare_ints)
    ours = AltCLIPImageProcessor.from_pretrained(tmp_path)
    oracle = _pil_image_processor_class().from_pretrained(tmp_path)
    image = photo_like(45, 31, seed=8)
    got = ours(image)["pixel_values"]
    assert got.shape == (1, 3, 26, 26)
    assert _max_diff(got, _theirs(oracle, image)) <= ATOL


def test_unreadable_inputs_raise_clear_errors(ours, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    data = (tmp_path / "good.jpg")
    photo_like(64, 64).save(data, format="JPEG")
    corrupt.write_bytes(data.read_bytes()[:300])  # a real header, a truncated body
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    for path, message in [(corrupt, "cannot decode"), (not_image, "not an image"), (tmp_path / "missing.png", "no such file")]:
        with pytest.raises(ImageLoadError, match=message):
            ours(images=str(path))
    with pytest.raises(TypeError, match="PIL images, paths"):
        ours(images=[3.5])


# ---------------------------------------------------------------------------------------------- processor


def test_processor_matches_transformers_altclip_processor(model_dir, ours, oracle_images):
    oracle = transformers.AltCLIPProcessor(
        image_processor=oracle_images, tokenizer=transformers.XLMRobertaTokenizer.from_pretrained(model_dir)
    )
    texts = ["a photo of a cat", "一只狗", ""]
    images = [photo_like(40, 30, seed=1), photo_like(30, 40, seed=2).convert("RGBA")]
    got = ours(text=texts, images=images)
    want = oracle(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)
    assert set(got) == {"input_ids", "attention_mask", "pixel_values"}
    assert torch.equal(got.input_ids, want["input_ids"])
    assert torch.equal(got.attention_mask, want["attention_mask"])
    assert _max_diff(got.pixel_values, want["pixel_values"]) <= ATOL
    moved = got.to("cpu", dtype=torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16 and moved.input_ids.dtype == torch.long


def test_processor_errors(tmp_path):
    with pytest.raises(AltCLIPError, match="tokenizer.json"):
        AltCLIPProcessor.from_pretrained(tmp_path)
    with pytest.raises(AltCLIPError, match="no such directory"):
        AltCLIPProcessor.from_pretrained(tmp_path / "absent")
    write_tokenizer_files(tmp_path)
    with pytest.raises(AltCLIPError, match="preprocessor_config.json"):
        AltCLIPProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="text, images"):
        AltCLIPProcessor(AltCLIPTokenizer.from_pretrained(tmp_path))()


def test_exported_from_package():
    import altclip_fast

    assert altclip_fast.AltCLIPProcessor is AltCLIPProcessor
