import os

import pytest
import torch

# Without CUDA, every Triton kernel runs on CPU tensors under Triton's interpreter. The switch is read
# when a kernel is decorated, so it must be set before any test imports `altclip_fast.kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly, with one reason, on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def full_size_checkpoint(tmp_path_factory):
    """A BAAI/AltCLIP-size checkpoint with random weights, written by transformers' save_pretrained.
    Building it costs ~30 s on 2 cores, so every full-size test shares this one directory."""
    from altclip_fast.modeling.config import AltCLIPConfig
    from tests.checkpoints import random_hf_model, save_hf

    return save_hf(random_hf_model(AltCLIPConfig(), seed=7), tmp_path_factory.mktemp("full_size"))
