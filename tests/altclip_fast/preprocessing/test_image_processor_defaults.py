"""AltCLIPImageProcessor built without a config, or from one that leaves fields out, equals
transformers' PIL CLIPImageProcessor built the same way: every other test builds both from a config
that sets every field, which would hide a wrong default."""

from __future__ import annotations

import numpy as np
import pytest

from altclip_fast.preprocessing.image_processing import AltCLIPImageProcessor
from tests.altclip_fast.processor_fixtures import photo_like

transformers = pytest.importorskip("transformers")

FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
          "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def _pil_class():
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _fields(processor) -> dict:
    out = {}
    for name in FIELDS:
        value = getattr(processor, name)
        if name in ("size", "crop_size"):
            value = {k: v for k, v in dict(value).items() if v is not None}
        elif name in ("image_mean", "image_std"):
            value = [float(v) for v in value]
        elif name == "resample":
            value = int(value)
        out[name] = value
    return out


@pytest.mark.parametrize("config", [{}, {"size": 40, "crop_size": 36}, {"do_center_crop": True, "image_mean": None}],
                         ids=["empty", "sizes-only", "null-field"])
def test_defaults_match_transformers(config):
    ours = AltCLIPImageProcessor() if not config else AltCLIPImageProcessor.from_dict(config)
    theirs = _pil_class()(**{k: v for k, v in config.items() if v is not None})
    assert _fields(ours) == _fields(theirs)
    images = [photo_like(61, 45, seed=1), photo_like(45, 300, seed=2)]
    want = theirs(images=images, return_tensors="np")["pixel_values"]
    got = ours.to_pixel_values([ours.prepare(image) for image in images])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
