"""Error measures used by the parity tests.

``rel_err`` is the norm-wise relative error ``||a - b|| / ||b||``. Logits get their own measure:
they are cosine similarities times ``exp(logit_scale)``, and for random models the cosines sit near
zero, where a relative error only measures cancellation. ``logits_err`` is the absolute error in
cosine units, ``max|a - b| / exp(logit_scale)``.
"""

from __future__ import annotations

import torch


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape, f"shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    assert torch.isfinite(ours).all(), "non-finite values"
    denom = theirs.norm().item()
    return (ours - theirs).norm().item() / (denom if denom > 0 else 1.0)


def logits_err(ours: torch.Tensor, theirs: torch.Tensor, logit_scale: torch.Tensor | float) -> float:
    assert ours.shape == theirs.shape, f"shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    scale = torch.as_tensor(logit_scale).double().exp().item()
    return (ours.double().cpu() - theirs.double().cpu()).abs().max().item() / scale
