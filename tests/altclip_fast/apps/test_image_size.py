"""``image_size`` / ``--image-size``: the processor resizes the shortest edge to N and crops N x N (as
transformers' CLIPImageProcessor with that size and crop size, bit for bit), and ``classify`` /
``embed`` then run the model with ``interpolate_pos_encoding``, matching transformers doing the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from altclip_fast.errors import AltCLIPError
from altclip_fast.preprocessing.image_processing import AltCLIPImageProcessor
from altclip_fast.preprocessing.processor import AltCLIPProcessor
from tests.altclip_fast.processor_fixtures import make_model_dir, photo_like

transformers = pytest.importorskip("transformers")

SIZE = 44  # the model's own size is 30 (patch 7): 6x6 patches instead of 4x4


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image_size")
    make_model_dir(root / "model")
    (root / "photos").mkdir()
    for i, (w, h) in enumerate([(80, 60), (50, 90), (45, 45)]):
        photo_like(w, h, seed=i).save(root / "photos" / f"img{i}.png")
    return root


def test_processor_matches_transformers_at_that_size(work):
    images = [photo_like(w, h, seed=3) for w, h in [(80, 60), (50, 90), (20, 30)]]
    # transformers 5's PIL class (CLIPImageProcessor itself before 5), as in test_processor.py.
    pil_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    theirs = pil_class(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    want = theirs(images=images, return_tensors="pt").pixel_values
    for ours in (AltCLIPImageProcessor(image_size=SIZE), AltCLIPProcessor.from_pretrained(work / "model", image_size=SIZE).image_processor):
        got = ours(images)["pixel_values"]
        assert got.shape == (3, 3, SIZE, SIZE)
        assert torch.equal(got, want)
    with pytest.raises(AltCLIPError, match="image_size"):
        AltCLIPImageProcessor(image_size=0)


def _oracle(work):
    model = transformers.AltCLIPModel.from_pretrained(work / "model").eval()
    return model, AltCLIPProcessor.from_pretrained(work / "model", image_size=SIZE)


def test_classify_and_embed_with_image_size(work):
    from tests.altclip_fast.apps.cli_helpers import CPU_FP32, run_cli

    model, processor = _oracle(work)
    images = sorted(str(p) for p in (work / "photos").glob("*.png"))
    labels = ["cat", "一只狗", "car"]
    proc = run_cli("classify", *images, "--labels", *labels, "--top-k", 3, "--json", "--model", "model",
                   "--image-size", SIZE, *CPU_FP32, cwd=work)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        probs = model(**processor(text=labels, images=images), interpolate_pos_encoding=True).logits_per_image.softmax(-1)
    for result, want in zip(json.loads(proc.stdout), probs.numpy()):
        order = np.argsort(-want)
        assert [p["label"] for p in result["predictions"]] == [labels[i] for i in order]
        np.testing.assert_allclose([p["probability"] for p in result["predictions"]], want[order], atol=2e-5)

    out = work / "photos.npy"
    proc = run_cli("embed", "photos", "--out", out, "--model", "model", "--workers", 0, "--image-size", SIZE,
                   *CPU_FP32, cwd=work)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(Path(str(out) + ".meta.json").read_text())["rows"]
    paths = [str(work / r["path"]) if not Path(r["path"]).is_absolute() else r["path"] for r in rows]
    with torch.no_grad():
        want = model.get_image_features(pixel_values=processor(images=paths).pixel_values, interpolate_pos_encoding=True)
    want = (want if isinstance(want, torch.Tensor) else want.pooler_output).numpy()
    np.testing.assert_allclose(np.load(out), want, atol=2e-5, rtol=1e-4)


def test_image_size_below_the_patch_is_a_one_line_error(work):
    from tests.altclip_fast.apps.cli_helpers import CPU_FP32, assert_one_line_error, run_cli

    proc = run_cli("classify", "photos/img0.png", "--labels", "cat", "--model", "model", "--image-size", 5,
                   *CPU_FP32, cwd=work)
    assert_one_line_error(proc, "--image-size must be at least the model's patch size 7")
