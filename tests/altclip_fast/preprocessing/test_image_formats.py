"""The one allow-list of image formats: what ``open_image`` opens, what it refuses (by name, before the
format's plugin sees the data), and image files given to the image processor by path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from altclip_fast.preprocessing.image_formats import DECODED_FORMATS, FormatRefused, open_image, signature_format
from altclip_fast.preprocessing.image_processing import AltCLIPImageProcessor, ImageLoadError
from tests.altclip_fast.image_format_samples import ALLOWED, EPS, encoded, refused, watch_ghostscript


@pytest.mark.parametrize("name,fmt,mode", ALLOWED)
def test_every_allowed_format_opens_as_pillow_opens_it(name, fmt, mode):
    raw = encoded(fmt, mode=mode)
    with open_image(io.BytesIO(raw)) as ours, Image.open(io.BytesIO(raw)) as theirs:
        assert ours.format == theirs.format and ours.format in DECODED_FORMATS
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("fmt", sorted(refused()))
def test_other_formats_pillow_reads_are_refused_by_name(fmt):
    raw = refused()[fmt]
    if fmt != "EPS":  # each would decode without the allow-list (EPS only with Ghostscript installed)
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
    with pytest.raises(FormatRefused) as caught:
        open_image(io.BytesIO(raw))
    assert caught.value.format == fmt
    assert str(caught.value).startswith(f"{fmt} images are not decoded (accepted formats: JPEG, PNG, WebP, GIF, ")


def test_eps_never_reaches_its_plugin_or_ghostscript(monkeypatch, tmp_path):
    used = watch_ghostscript(monkeypatch)
    with pytest.raises(FormatRefused, match="^EPS images are not decoded"):
        open_image(io.BytesIO(EPS))
    path = tmp_path / "photo.jpg"  # the name does not matter: Pillow goes by the bytes
    path.write_bytes(EPS)
    with pytest.raises(FormatRefused):
        open_image(path)
    with pytest.raises(ImageLoadError) as caught:
        AltCLIPImageProcessor().prepare(str(path))
    assert str(caught.value) == f"{path}: EPS images are not decoded (accepted formats: JPEG, PNG, WebP, GIF, BMP, " \
                                "TIFF, PPM/PGM/PBM)"
    assert used == []


def test_data_no_plugin_claims_stays_unidentified():
    for raw in (b"hello, this is text", b"", b"\0" * 3, b"8BP"):
        with pytest.raises(Image.UnidentifiedImageError):
            open_image(io.BytesIO(raw))
        assert signature_format(io.BytesIO(raw)) is None


@pytest.mark.parametrize("name,fmt,mode", ALLOWED)
def test_paths_in_allowed_formats_prepare_as_before(tmp_path, name, fmt, mode):
    """``prepare(path)`` equals preparing the image Pillow opens from the path without the allow-list."""
    path = tmp_path / f"image.{name.lower()}"
    path.write_bytes(encoded(fmt, 52, 44, seed=3, mode=mode))
    processor = AltCLIPImageProcessor()
    with Image.open(path) as image:
        image.load()
        expected = processor.prepare(image)
    assert np.array_equal(processor.prepare(str(path)), expected)


def test_pillow_is_imported_when_an_image_is_opened_not_when_the_cli_parses_arguments():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from altclip_fast.apps.cli import build_parser; build_parser(); "
            "import altclip_fast.preprocessing.image_formats; print('PIL' in sys.modules)")
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
