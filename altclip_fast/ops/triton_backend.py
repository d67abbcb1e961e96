"""The Triton backend: the kernels of ``altclip_fast.kernels``.

On CUDA each GEMM shape runs through whichever of the Triton kernel (fused epilogue) and torch's GEMM
(cuBLAS, epilogue in torch) measured faster for it on this GPU (see ``gemm_choice``); the ``gemm`` mode
(``$ALTCLIP_FAST_GEMM`` when the op set is made) can force one path. Attention and LayerNorm are always
kernels.

Without CUDA the kernels can only run under Triton's interpreter. Its switch, ``TRITON_INTERPRET``, is
read when a kernel is defined and again while an interpreted kernel runs (Triton's lazy imports and
constexpr handling check it), so the backend sets it to 1 for exactly those moments, importing the
kernels and each op call on interpreted kernels, and puts the previous value back after each: the
rest of the process never sees it changed. (Not thread-safe on that path, which exists for tests.)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys

import torch
import torch.nn.functional as F

from .gemm_choice import MeasuredChoice, gemm_mode
from .layouts import PackedLayout, padded_kv
from .torch_backend import torch_linear

__all__ = ["TritonOps", "load_kernels", "pad_in_features"]

_PACKAGE = "altclip_fast.kernels"
_MODULES = ("attention", "layer_norm", "linear")

# Triton proves a load aligned only from a row stride divisible by 16 elements; without that proof it
# cannot pipeline the loads: the patch embedding's K = 3 x 14 x 14 = 588 compiled with no cp.async on
# sm_80 or sm_90, and 6 of 14 configs spilled on sm_90 (up to 0.9 KiB of stack), 7 on sm_80 (up to 4.5
# KiB; Triton 3.9). Zero columns up to a multiple of 64 put such a weight on the unmasked K loop that
# every other AltCLIP GEMM runs, whose compile facts are clean (tests/kernels/test_compile_facts.py); the
# zeros add exact zeros. Chosen over handing the shape to cuBLAS: the padded launch is code already proven
# for the other GEMMs, it costs 1.3 MB and 9% more of a GEMM that is 0.2% of the model's FLOPs, and
# gemm="auto" still measures it against cuBLAS.
ALIGNED_K = 16
PADDED_K_MULTIPLE = 64  # the kernel's unmasked K loop (EVEN_K) needs K % 64 == 0


def pad_in_features(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` as is, or with zero columns up to a multiple of 64 if ``in`` is not a
    multiple of 16. ``linear`` takes x of either width; a caller that builds x anyway can build it
    that wide, zeros past its real features, and spare the backend a copy."""
    k = weight.shape[1]
    if k % ALIGNED_K == 0:
        return weight
    padded = weight.new_zeros(weight.shape[0], -(-k // PADDED_K_MULTIPLE) * PADDED_K_MULTIPLE)
    padded[:, :k] = weight
    return padded


@contextlib.contextmanager
def _interpreter_switch(on: bool):
    """``TRITON_INTERPRET=1`` for the duration of the block when ``on``, then the previous value."""
    if not on:
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def load_kernels():
    """The kernels package with every op module imported. Without CUDA they are defined for the
    interpreter; once any kernel module exists, the rest follow its mode."""
    missing = [m for m in _MODULES if f"{_PACKAGE}.{m}" not in sys.modules]
    if missing:
        runtime = sys.modules.get(f"{_PACKAGE}._runtime")
        interpret = runtime.INTERPRETED if runtime is not None else not torch.cuda.is_available()
        if interpret and _triton_compiled_mode():
            raise RuntimeError(
                "the triton backend has no CUDA device here, so it runs the kernels under Triton's interpreter, "
                "but Triton was already imported (by transformers or torch.compile, say) with the interpreter "
                "off, and interpreted kernels cannot call its compiled helpers. Set TRITON_INTERPRET=1 in the "
                "environment before starting Python, or use backend='torch' (ALTCLIP_FAST_BACKEND=torch)"
            )
        try:
            with _interpreter_switch(interpret):
                for name in missing:
                    importlib.import_module(f"{_PACKAGE}.{name}")
        except ImportError as exc:
            raise ImportError(
                f"the triton backend needs Triton ({exc}); use backend='torch' or ALTCLIP_FAST_BACKEND=torch"
            ) from exc
    return sys.modules[_PACKAGE]


def _triton_compiled_mode() -> bool:
    """Whether Triton itself was imported with its interpreter off: its own jit helpers (``tl.cdiv``
    and the like) are then GPU-compiler objects, which an interpreted kernel cannot call."""
    language = sys.modules.get("triton.language")
    if language is None:
        return False
    from triton.runtime.jit import JITFunction

    return isinstance(getattr(language, "cdiv", None), JITFunction)


def _kernel_op(method):
    """An op that reaches the kernels: check the device, and switch the interpreter on around the call
    when the kernels are interpreted."""

    @functools.wraps(method)
    def run(self, x, *args, **kwargs):
        if not self.kernels._runtime.INTERPRETED:
            if not x.is_cuda:
                raise RuntimeError(
                    f"the triton backend got {x.device} tensors, but the kernels were compiled for CUDA "
                    "(TRITON_INTERPRET was not 1 when they were imported); use ALTCLIP_FAST_BACKEND=torch"
                )
            # Compiled kernels: every op of every layer passes here, so no context manager on this path.
            return method(self, x, *args, **kwargs)
        with _interpreter_switch(True):
            return method(self, x, *args, **kwargs)

    return run


class TritonOps:
    """The fused Triton kernels. ``gemm``: ``auto`` (measure per shape on CUDA), ``triton`` or ``torch``."""

    name = "triton"

    def __init__(self, gemm: str | None = None):
        self.gemm = gemm_mode(gemm)
        self._kernels = None
        self.gemm_paths = MeasuredChoice()  # per-shape GEMM path on CUDA, measured on first use

    @property
    def kernels(self):
        if self._kernels is None:
            self._kernels = load_kernels()
        return self._kernels

    # -- prepare step: the kernels take the checkpoint's weights as they are, rows aligned -------------

    def prepare_weight(self, weight):
        return pad_in_features(weight)

    def prepare_mlp(self, fc1_weight, fc1_bias, fc2_weight, activation, *, sources=None):
        return fc1_weight, fc1_bias, fc2_weight, activation

    # -- ops --------------------------------------------------------------------------------------

    def _gemm(self, x, weight, bias=None, *, activation=None, residual=None):
        """``act(x @ weight.T + bias) (+ residual)`` through the Triton kernel or torch, per ``gemm_choice``."""
        if x.shape[-1] < weight.shape[1]:  # a weight padded by prepare_weight: zeros meet zeros
            x = F.pad(x, (0, weight.shape[1] - x.shape[-1]))
        path = self.gemm
        if path == "auto":
            # Under the interpreter (CPU) the kernels are what this backend exists to run.
            path = self._measured_path(x, weight, bias, activation, residual) if x.is_cuda else "triton"
        if path == "torch":
            return torch_linear(x, weight, bias, activation, residual)
        return self.kernels.linear(x, weight, bias, activation=activation, residual=residual)

    def _measured_path(self, x, weight, bias, activation, residual) -> str:
        rows = x.numel() // x.shape[-1]
        # Rows are bucketed to their power-of-two ceiling, as the kernel's autotune key does: packed
        # text changes the exact count every batch.
        key = (str(x.device), str(x.dtype).removeprefix("torch."), 1 << max(rows - 1, 0).bit_length(),
               weight.shape[0], weight.shape[1], bias is not None, activation, residual is not None,
               x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
        return self.gemm_paths.pick(key, {
            "triton": lambda: self.kernels.linear(x, weight, bias, activation=activation, residual=residual),
            "torch": lambda: torch_linear(x, weight, bias, activation, residual),
        }, default="triton")

    @_kernel_op
    def linear(self, x, weight, bias=None, *, activation=None, residual=None):
        if activation == "silu":
            raise ValueError("the triton backend runs quick_gelu itself; silu is the torch backend's fold")
        return self._gemm(x, weight, bias, activation=activation, residual=residual)

    @_kernel_op
    def layer_norm(self, x, weight, bias, eps):
        return self.kernels.add_layer_norm(x, weight, bias, eps=eps)

    @_kernel_op
    def add_layer_norm(self, x, residual, weight, bias, eps, *, return_sum=False):
        return self.kernels.add_layer_norm(x, weight, bias, residual=residual, eps=eps, return_sum=return_sum)

    @_kernel_op
    def linear_add_layer_norm(self, x, weight, bias, residual, ln_weight, ln_bias, eps, *, return_sum=False):
        # The bias goes into the LayerNorm kernel's x_bias: one pass fewer over the GEMM output.
        y = self._gemm(x, weight)
        return self.kernels.add_layer_norm(
            y, ln_weight, ln_bias, residual=residual, x_bias=bias, eps=eps, return_sum=return_sum
        )

    @_kernel_op
    def attention(self, qkv, num_heads, layout, scale=None):
        head_dim = qkv.shape[-1] // (3 * num_heads)
        if isinstance(layout, PackedLayout):
            q, k, v = qkv.view(-1, 3, num_heads, head_dim).unbind(1)
            out = self.kernels.attention(
                q, k, v, cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen, scale=scale
            )
        else:
            q, k, v = qkv.view(layout.batch, layout.seqlen, 3, num_heads, head_dim).unbind(2)
            out = self.kernels.attention(q, k, v, key_padding_mask=layout.key_padding_mask, scale=scale)
        return out.reshape(layout.num_tokens, num_heads * head_dim)

    @_kernel_op
    def query_attention(self, q, kv, num_heads, layout, scale=None):
        if isinstance(layout, PackedLayout):
            return self.query_attention(q, layout.scatter_to_grid(kv), num_heads, layout.grid, scale)
        k, v = padded_kv(kv, num_heads, layout)
        q = q.view(layout.batch, 1, num_heads, -1)
        return self.kernels.attention(q, k, v, key_padding_mask=layout.key_padding_mask, scale=scale).reshape(
            layout.batch, -1
        )
