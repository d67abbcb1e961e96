"""The operations the model runs, behind one interface (``Ops``), with a torch and a Triton backend.

A model resolves its backend once, when it is built or loaded, moved (``.to()``, ``.half()``, ...) or
given another ``backend``: ``resolve_backend`` picks the name and ``get_ops`` the op set. The
environment (``ALTCLIP_FAST_BACKEND``, ``ALTCLIP_FAST_GEMM``, ``ALTCLIP_FAST_CPU_HALF_GEMM``,
``ALTCLIP_FAST_CPU_FP32_GEMM``) is read then, not on every call.

Backends:

- ``"torch"`` (``torch_backend``): plain torch; on CPU in bf16/fp16 oneDNN's fused GEMM epilogues on
  pre-blocked weights (``onednn``), or fp32 GEMMs where the CPU has no instructions for the half
  dtype (``cpu_half``); fp32 GEMMs on oneDNN or torch's BLAS, whichever this CPU runs faster
  (``cpu_fp32_gemm``). The default for CPU tensors.
- ``"triton"`` (``triton_backend``): the kernels of ``altclip_fast.kernels``. The default for CUDA
  tensors. Without CUDA it runs them under Triton's interpreter (slow: for tests that drive the whole
  model through the kernels). Triton is imported only when this backend is used.

``ALTCLIP_FAST_BACKEND`` (``auto``, ``torch`` or ``triton``) sets the default; an explicit ``backend=``
argument wins over it.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

from .cpu_fp32_gemm import cpu_fp32_gemm_mode
from .cpu_half import cpu_half_mode
from .gemm_choice import gemm_mode
from .layouts import PackedLayout, PaddedLayout, explicit_attention
from .settings import choose

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "Ops",
    "PackedLayout",
    "PaddedLayout",
    "explicit_attention",
    "get_ops",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "ALTCLIP_FAST_BACKEND"


class Ops(Protocol):
    """What a backend provides. Rows are tokens: ``x`` is ``[tokens, features]`` (or any ``[..., features]``).

    The prepare step, run by the model when it is loaded or moved (never inside a forward), turns
    checkpoint weights into the forms the backend runs fastest. Each method returns its inputs
    unchanged where there is nothing to gain, else derived copies that the caller keeps:

    - ``prepare_weight(weight) -> weight'``: the form of a GEMM weight ``[out, in]`` that ``linear``
      and ``linear_add_layer_norm`` take (e.g. pre-blocked for oneDNN). It may have more in-features
      than ``weight``, zeros past the real ones (the Triton kernels' aligned rows); ``linear`` then
      takes x of either width, so a caller may build x that wide itself, zeros past its features.
    - ``prepare_mlp(fc1_weight, fc1_bias, fc2_weight, activation, *, sources=None)
      -> (fc1_weight', fc1_bias', fc2_weight', activation')``: an MLP ``fc2(act(fc1(x)))`` rewritten
      into an equivalent one the backend fuses better (e.g. quick_gelu folded into SiLU). ``sources``
      are the same three tensors at the checkpoint's precision, to derive from with one rounding.

    The ops:

    - ``linear(x, weight, bias=None, *, activation=None, residual=None)``:
      ``act(x @ weight.T + bias) (+ residual)``;
    - ``layer_norm(x, weight, bias, eps)``;
    - ``add_layer_norm(x, residual, weight, bias, eps, *, return_sum=False)``: ``LayerNorm(x + residual)``
      and, on request, the sum;
    - ``linear_add_layer_norm(x, weight, bias, residual, ln_weight, ln_bias, eps, *, return_sum=False)``:
      ``LayerNorm(x @ weight.T + bias + residual)`` and, on request, the pre-norm sum (the residual
      stream of a pre-LN layer). Post-LN and pre-LN layers both end their sub-blocks with it;
    - ``attention(qkv, num_heads, layout, scale=None)``: softmax attention over the output of a fused
      QKV projection ``[tokens, 3 * hidden]``, for a ``PaddedLayout`` or a ``PackedLayout``;
    - ``query_attention(q, kv, num_heads, layout, scale=None)``: the same for one query per sequence
      (``q`` ``[batch, hidden]``) over its sequence's keys and values (``kv`` ``[tokens, 2 * hidden]``).
    """

    name: str

    def prepare_weight(self, weight: torch.Tensor) -> torch.Tensor: ...

    def prepare_mlp(
        self, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
        activation: str, *, sources: tuple | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, str]: ...

    def linear(self, x, weight, bias=None, *, activation=None, residual=None) -> torch.Tensor: ...

    def layer_norm(self, x, weight, bias, eps) -> torch.Tensor: ...

    def add_layer_norm(self, x, residual, weight, bias, eps, *, return_sum=False): ...

    def linear_add_layer_norm(self, x, weight, bias, residual, ln_weight, ln_bias, eps, *, return_sum=False): ...

    def attention(self, qkv, num_heads, layout, scale=None) -> torch.Tensor: ...

    def query_attention(self, q, kv, num_heads, layout, scale=None) -> torch.Tensor: ...


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """The backend that runs ops on ``device``: the argument, else ``$ALTCLIP_FAST_BACKEND``, else auto
    (Triton for CUDA, torch otherwise)."""
    name = choose(backend, ENV_VAR, BACKENDS, "backend")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return name


def get_ops(backend: str, *, gemm: str | None = None, cpu_half_gemm: str | None = None,
            cpu_fp32_gemm: str | None = None) -> Ops:
    """The op set of a resolved backend name (``"torch"`` or ``"triton"``). ``gemm`` (Triton only):
    ``auto``, ``triton`` or ``torch``, else ``$ALTCLIP_FAST_GEMM``. ``cpu_half_gemm`` (torch only):
    ``auto``, ``native`` or ``fp32``, else ``$ALTCLIP_FAST_CPU_HALF_GEMM``. ``cpu_fp32_gemm`` (torch
    only): ``auto``, ``onednn`` or ``blas``, else ``$ALTCLIP_FAST_CPU_FP32_GEMM``. Op sets are shared:
    one per backend and mode, so measured GEMM choices serve every model."""
    if backend == "torch":
        return _torch_ops(cpu_half_mode(cpu_half_gemm), cpu_fp32_gemm_mode(cpu_fp32_gemm))
    if backend == "triton":
        return _triton_ops(gemm_mode(gemm))
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")


@functools.cache
def _torch_ops(cpu_half_gemm: str, cpu_fp32_gemm: str):
    from .torch_backend import TorchOps

    return TorchOps(cpu_half_gemm, cpu_fp32_gemm)


@functools.cache
def _triton_ops(gemm: str):
    from .triton_backend import TritonOps

    return TritonOps(gemm)
