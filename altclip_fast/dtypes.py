"""The dtypes altclip-fast runs in, and the names users may give them (``"bf16"``, ``"torch.float16"``)."""

from __future__ import annotations

import torch

__all__ = ["DTYPE_NAMES", "resolve_dtype"]

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``None`` means float32 (transformers 4's default); names like ``"bf16"`` are accepted."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.").lower()
        if key not in DTYPE_NAMES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        return DTYPE_NAMES[key]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    return dtype
