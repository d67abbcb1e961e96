"""fp16 / bf16 on CPU (and on a GPU when there is one): the fast model's error against the fp32
reference is at most 2x the error of plain PyTorch in the same dtype (the reference model run in that
dtype, which is transformers' math), plus a small floor; zero-shot argmax agrees with fp32 everywhere
on the test batch. Inputs come in fp32 and are cast at the boundary."""

from __future__ import annotations

import pytest
import torch

import altclip_fast.reference as reference
from altclip_fast.modeling import model as fast
from tests.checkpoints import make_pixels, make_text_batch, random_hf_model, save_hf, tiny_config
from tests.parity import logits_err, rel_err

pytest.importorskip("transformers")

CONFIG = tiny_config(text_hidden=60, text_heads=3, vision_hidden=80, vision_heads=5, layers=3,
                     image_size=50, patch_size=7)
FLOOR = {torch.float16: 2e-4, torch.bfloat16: 2e-3}  # relative; absorbs lucky-small torch errors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf(random_hf_model(CONFIG, seed=13), tmp_path_factory.mktemp("lowp"))


@pytest.fixture(scope="module")
def batch():
    ids, mask = make_text_batch(CONFIG, [6, 14, 3, 9, 11, 1], seed=3)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(CONFIG, 4, seed=4))


@pytest.fixture(scope="module")
def fp32_answer(checkpoint, batch):
    with torch.no_grad():
        return reference.AltCLIPModel.from_pretrained(checkpoint)(**batch)


def check_three_way(checkpoint, batch, fp32_answer, dtype, device):
    plain = reference.AltCLIPModel.from_pretrained(checkpoint, dtype=dtype, device=device)
    ours = fast.AltCLIPModel.from_pretrained(checkpoint, dtype=dtype, device=device)
    with torch.no_grad():
        theirs = plain(**{k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()})
    mine = ours(**batch)  # fp32 pixels, CPU tensors: cast and moved at the boundary
    assert mine.image_embeds.dtype == dtype
    scale = plain.logit_scale.float().cpu()
    for name in ("text_embeds", "image_embeds"):
        ours_err = rel_err(mine[name].cpu(), fp32_answer[name])
        torch_err = rel_err(theirs[name].cpu(), fp32_answer[name])
        assert ours_err <= 2 * torch_err + FLOOR[dtype], f"{name}: ours {ours_err:.2e} vs torch {torch_err:.2e}"
    ours_err = logits_err(mine.logits_per_image.cpu(), fp32_answer.logits_per_image, scale)
    torch_err = logits_err(theirs.logits_per_image.cpu(), fp32_answer.logits_per_image, scale)
    assert ours_err <= 2 * torch_err + FLOOR[dtype]
    # Zero-shot classification: each image's best text, and each text's best image.
    assert torch.equal(mine.logits_per_image.argmax(-1).cpu(), fp32_answer.logits_per_image.argmax(-1))
    assert torch.equal(mine.logits_per_text.argmax(-1).cpu(), fp32_answer.logits_per_text.argmax(-1))
    # The pooled-only getters agree with the forward in the same dtype.
    features = ours.get_image_features(batch["pixel_values"])
    assert rel_err(features / features.norm(dim=-1, keepdim=True), mine.image_embeds) < 4 * FLOOR[dtype]


@pytest.mark.parametrize("half_gemm", ["native", "fp32-onednn", "fp32-blas"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cpu_low_precision(checkpoint, batch, fp32_answer, dtype, half_gemm, monkeypatch):
    # Every way a CPU runs half GEMMs, whichever this CPU picks by itself: native (altclip_fast/ops/
    # cpu_half.py), or upcast to fp32 GEMMs on either fp32 library (ops/cpu_fp32_gemm.py).
    mode, _, library = half_gemm.partition("-")
    monkeypatch.setenv("ALTCLIP_FAST_CPU_HALF_GEMM", mode)
    monkeypatch.setenv("ALTCLIP_FAST_CPU_FP32_GEMM", library or "auto")
    check_three_way(checkpoint, batch, fp32_answer, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_low_precision_through_the_kernels(checkpoint, batch, fp32_answer, dtype):
    check_three_way(checkpoint, batch, fp32_answer, dtype, "cuda")
