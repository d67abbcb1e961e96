"""What ``"auto"`` means for a device and for a dtype: the one place these two choices are made."""

from __future__ import annotations

import torch

__all__ = ["auto_device", "auto_dtype"]


def auto_device() -> torch.device:
    """CUDA when this process can see a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """GPU: bf16 where the card computes in it (Ampere and later), else fp16. CPU: fp32, the safe choice
    (no reduced-precision drift in embeddings)."""
    device = torch.device(device)
    if device.type == "cuda":
        # Asked of the card itself: torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated.
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32
