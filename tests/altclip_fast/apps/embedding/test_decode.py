"""The embedding decoder and the image-format allow-list: every one of the pipeline's image extensions
still gives the crop it gave before (byte for byte, from a file and from webdataset bytes), and any
other format, EPS first, is a skip whose reason names it, without Pillow's EPS plugin or Ghostscript."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from altclip_fast.apps.embedding.decode import decode, decode_columns
from altclip_fast.apps.embedding.inputs import IMAGE_EXTENSIONS
from altclip_fast.preprocessing.image_processing import AltCLIPImageProcessor
from tests.altclip_fast.apps.cli_helpers import cli_main
from tests.altclip_fast.image_format_samples import EPS, encoded, psd, refused, watch_ghostscript
from tests.altclip_fast.processor_fixtures import make_model_dir

# Each of the pipeline's extensions, as the file would be written: (Pillow format, mode or None).
WRITTEN_AS = {".jpg": ("JPEG", None), ".jpeg": ("JPEG", None), ".jfif": ("JPEG", None), ".png": ("PNG", None),
              ".webp": ("WEBP", None), ".bmp": ("BMP", None), ".gif": ("GIF", None), ".tif": ("TIFF", None),
              ".tiff": ("TIFF", None), ".ppm": ("PPM", None), ".pgm": ("PPM", "L"), ".pbm": ("PPM", "1")}


def before(processor, source) -> np.ndarray:
    """The crop as the decoder made it before the allow-list: Pillow's own ``Image.open``."""
    with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
        image.load()
        return processor.prepare(image)


def test_every_image_extension_is_written_as_one_format():
    assert sorted(WRITTEN_AS) == sorted(IMAGE_EXTENSIONS)


@pytest.mark.parametrize("extension", sorted(WRITTEN_AS))
def test_every_image_extension_decodes_byte_identically(tmp_path, extension):
    processor = AltCLIPImageProcessor(size=24, crop_size=24)
    fmt, mode = WRITTEN_AS[extension]
    path = tmp_path / f"image{extension}"
    path.write_bytes(encoded(fmt, 50, 38, seed=5, mode=mode))
    expected = before(processor, path)
    for source in (str(path), path.read_bytes()):
        crop, reason = decode(processor, source)
        assert reason is None
        assert crop.dtype == np.uint8 and np.array_equal(crop, expected)


@pytest.mark.parametrize("fmt", sorted(refused()))
def test_other_formats_are_skipped_with_a_reason_naming_them(tmp_path, monkeypatch, fmt):
    used = watch_ghostscript(monkeypatch)
    processor = AltCLIPImageProcessor(size=24, crop_size=24)
    path = tmp_path / "disguised.jpg"  # the extension the pipeline takes; the bytes say otherwise
    path.write_bytes(refused()[fmt])
    reason = f"{fmt} images are not decoded (accepted formats: JPEG, PNG, WebP, GIF, BMP, TIFF, PPM/PGM/PBM)"
    assert decode(processor, str(path)) == (None, reason)
    assert decode(processor, path.read_bytes()) == (None, reason)
    columns = decode_columns(processor, [path.read_bytes(), encoded("PNG")])
    assert columns["ok"].tolist() == [False, True] and columns["reason"][0] == reason
    assert used == []


def test_an_embed_run_skips_an_eps_and_a_psd_by_name(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")  # the tiny checkpoint is written by transformers
    used = watch_ghostscript(monkeypatch)
    make_model_dir(tmp_path / "model")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(encoded("PNG"))
    (photos / "b.jpg").write_bytes(EPS)
    (photos / "c.tif").write_bytes(psd())
    out = tmp_path / "emb.npy"
    argv = ["embed", "photos", "--out", out, "--model", "model", "--device", "cpu", "--dtype", "fp32", "--workers",
            "0", "--no-progress"]
    assert cli_main(*argv, cwd=tmp_path) == 0
    err = capsys.readouterr().err
    assert "skipped photos/b.jpg: EPS images are not decoded" in err
    assert "skipped photos/c.tif: PSD images are not decoded" in err
    assert np.load(out).shape[0] == 1 and used == []
