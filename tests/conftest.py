import os

import torch

# Without CUDA, every Triton kernel runs on CPU tensors under Triton's interpreter. The switch is read
# when a kernel is decorated, so it must be set before any test imports `kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
