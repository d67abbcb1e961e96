"""Input checks shared by the kernel launchers.

A launcher calls these before any launch, so bad input is a ``TypeError``/``ValueError`` naming the
argument, never a Triton crash or a silently wrong answer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    last_dim_contiguous: bool = True,
    contiguous: bool = False,
) -> None:
    """Raise if ``t`` is not a tensor of the given rank, dtype and device.

    ``last_dim_contiguous`` is what strided kernels need (rows may be strided, elements may not);
    ``contiguous`` asks for a fully contiguous tensor.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise unless ``t.shape == expected``."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def as_rows(name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as a 2-D ``[rows, n]`` view (row stride free, unit column stride), never a copy."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, n)
    except RuntimeError:
        raise ValueError(
            f"{name} with shape {tuple(t.shape)} and strides {t.stride()} cannot be viewed as rows of {n} "
            "elements without a copy; pass a contiguous tensor"
        ) from None
