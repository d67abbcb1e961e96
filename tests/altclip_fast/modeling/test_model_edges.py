"""Edges of the model API: a CUDA device on a machine without one, an empty image batch."""

from __future__ import annotations

import pytest
import torch

from altclip_fast.errors import AltCLIPError
from altclip_fast.modeling import model as fast
from altclip_fast.modeling.checkpoint import canonicalize_keys
from tests.checkpoints import make_text_batch, random_hf_model, save_hf, tiny_config

pytest.importorskip("transformers")

CONFIG = tiny_config()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return save_hf(random_hf_model(CONFIG, seed=3), tmp_path_factory.mktemp("edges"))


@pytest.fixture(scope="module")
def canonical():
    return canonicalize_keys(random_hf_model(CONFIG, seed=3).state_dict())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("load", ["model", "vision", "text", "state_dict"])
def test_cuda_without_cuda_is_a_clear_error_naming_the_device(checkpoint_dir, canonical, load):
    with pytest.raises(AltCLIPError, match=r"device='cuda:0': CUDA is not available on this machine .*device='cpu'"):
        if load == "model":
            fast.AltCLIPModel.from_pretrained(checkpoint_dir, device="cuda:0")
        elif load == "vision":
            fast.AltCLIPVisionModel.from_pretrained(checkpoint_dir, device="cuda:0")
        elif load == "text":
            fast.AltCLIPTextModel.from_pretrained(checkpoint_dir, device=torch.device("cuda:0"))
        else:
            fast.AltCLIPModel.from_state_dict(CONFIG, canonical, device="cuda:0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_empty_image_batch_gives_empty_outputs(canonical, dtype):
    model = fast.AltCLIPModel.from_state_dict(CONFIG, canonical, dtype=dtype, backend="torch")
    vc = CONFIG.vision_config
    empty = torch.empty(0, 3, vc.image_size, vc.image_size)
    assert model.get_image_features(empty).shape == (0, CONFIG.projection_dim)
    out = model.vision_model(empty, output_hidden_states=True)
    tokens = 1 + (vc.image_size // vc.patch_size) ** 2
    assert out.last_hidden_state.shape == (0, tokens, vc.hidden_size) and out.pooler_output.shape == (0, vc.hidden_size)
    assert all(h.shape == (0, tokens, vc.hidden_size) for h in out.hidden_states)
    ids, mask = make_text_batch(CONFIG, [4, 2], seed=1)
    both = model(input_ids=ids, attention_mask=mask, pixel_values=empty)
    assert both.logits_per_text.shape == (2, 0) and both.logits_per_image.shape == (0, 2)
