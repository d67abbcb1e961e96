import os

import torch

# Without CUDA, every Triton kernel runs on CPU tensors under Triton's interpreter. The switch is read
# when a kernel is decorated, so it must be set before any test imports `kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly, with one reason, on machines without CUDA."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
