"""The torch backend: plain torch ops, and on CPU oneDNN's fused GEMM epilogues where they work.

On CPU in bf16/fp16 (where ``onednn`` probes show it works) a linear runs as one oneDNN GEMM with its
bias and activation, or its residual add, fused, on weights pre-blocked for oneDNN by the prepare
step. On a CPU without instructions for the half dtype, GEMMs of many rows run in fp32 instead
(``cpu_half``), and nothing is pre-blocked or folded: there it gains nothing (bench/bench_cpu_half.py).
fp32 GEMMs (the model's, and the upcast ones) run on whichever of oneDNN's fused linear and torch's
BLAS GEMM is faster on this CPU (``cpu_fp32_gemm``: measured, not assumed), on the plain weights: a
pre-blocked fp32 copy would double the GEMM weights' memory for a few percent (bench/RESULTS.md).
Attention is ``F.scaled_dot_product_attention``.

oneDNN fuses SiLU but not quick_gelu. Since ``quick_gelu(y) = silu(a*y) / a`` (``a = QUICK_GELU_ALPHA``),
an MLP whose fc1 weight and bias are scaled by ``a`` and whose fc2 weight is scaled by ``1/a`` computes
the same thing with SiLU: ``prepare_mlp`` derives those scaled copies where half GEMMs are fused.
(oneDNN's "swish" ignores an alpha argument, so the scale cannot go into the op instead.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.activations import ACTIVATIONS as _KERNEL_ACTIVATIONS, QUICK_GELU_ALPHA
from . import cpu_half, onednn
from .cpu_fp32_gemm import cpu_fp32_gemm_mode, fp32_uses_onednn
from .layouts import PackedLayout, padded_kv, padded_qkv

__all__ = ["TorchOps", "ACTIVATIONS", "QUICK_GELU_FOLD"]

# "silu" is what a folded quick_gelu MLP runs.
ACTIVATIONS = (None, *_KERNEL_ACTIVATIONS, "silu")

# fc1 weight, fc1 bias, fc2 weight: the factor that turns each checkpoint tensor into its folded form.
QUICK_GELU_FOLD = (QUICK_GELU_ALPHA, QUICK_GELU_ALPHA, 1.0 / QUICK_GELU_ALPHA)

# Our activation name -> oneDNN's (attr, algorithm); quick_gelu has no oneDNN form.
_ONEDNN_ACTIVATION = {None: ("none", None), "gelu": ("gelu", "none"), "silu": ("swish", None)}


def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _activate_(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """Apply ``activation`` to a fresh tensor in place (it is ours: no caller sees it)."""
    if activation is None:
        return y
    if activation == "gelu":
        # On CPU, writing back into y spares a fresh [tokens, ffn] buffer (page faults); on CUDA the caching
        # allocator makes the new buffer free and the copy would be a whole extra pass.
        return F.gelu(y) if y.is_cuda else y.copy_(F.gelu(y))
    if activation == "silu":
        return F.silu(y, inplace=True)
    if activation == "quick_gelu":
        if y.dtype == torch.float32:
            # silu(a*y)/a in place: no [tokens, ffn] temporary; the two scalings cost ~1 ulp in fp32.
            return F.silu(y.mul_(QUICK_GELU_ALPHA), inplace=True).div_(QUICK_GELU_ALPHA)
        gate = torch.mul(y, QUICK_GELU_ALPHA).sigmoid_()
        return y.mul_(gate)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def torch_linear(x, weight, bias=None, activation=None, residual=None):
    """The GEMM in torch (cuBLAS fuses the bias on CUDA), then the activation and residual in place."""
    y = _activate_(F.linear(x, weight, bias), activation)
    return y if residual is None else y.add_(residual)


def upcast_linear(x, weight, bias=None, activation=None, residual=None, *, fp32_linear=torch_linear):
    """``fp32_linear`` (``torch_linear`` by default) on exactly upcast operands, rounded once to ``x.dtype``."""
    up = lambda t: None if t is None else t.float()  # noqa: E731
    return fp32_linear(up(x), up(weight), up(bias), activation=activation, residual=up(residual)).to(x.dtype)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _fold(tensor, factor, like):
    """``tensor`` (a checkpoint tensor, or the parameter itself) scaled in fp32, rounded once to ``like``."""
    if tensor is None:
        return None
    return (tensor.float() * factor).to(device=like.device, dtype=like.dtype)


class TorchOps:
    """Plain torch ops; on CPU, oneDNN's fused GEMM epilogues where they work."""

    name = "torch"

    def __init__(self, cpu_half_gemm: str = "auto", cpu_fp32_gemm: str = "auto"):
        self.cpu_half_gemm = cpu_half.cpu_half_mode(cpu_half_gemm)
        self.cpu_fp32_gemm = cpu_fp32_gemm_mode(cpu_fp32_gemm)

    def _upcasts(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether half GEMMs on this device run in fp32 past ``cpu_half.UPCAST_FROM_ROWS`` rows."""
        return cpu_half.upcasts(self.cpu_half_gemm, device, dtype)

    def _prepares(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether the prepare step derives oneDNN forms (pre-blocked, quick_gelu folded) for this dtype:
        half dtypes only (fp32 runs the parameters themselves)."""
        return dtype != torch.float32 and self._onednn(device, dtype) and not self._upcasts(device, dtype)

    def _onednn(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether GEMMs of this device and dtype run fused in oneDNN: CPU bf16/fp16 where it works,
        CPU fp32 where it is the faster library (``cpu_fp32_gemm``)."""
        if device.type != "cpu":
            return False
        if dtype == torch.float32:
            return fp32_uses_onednn(self.cpu_fp32_gemm)
        return onednn.fused_linear_works(dtype)

    # -- prepare step ----------------------------------------------------------------------------

    def prepare_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self._prepares(weight.device, weight.dtype) and onednn.prepack_works(weight.dtype):
            return onednn.prepack(weight)
        return weight

    def prepare_mlp(self, fc1_weight, fc1_bias, fc2_weight, activation, *, sources=None):
        if activation != "quick_gelu" or not self._prepares(fc1_weight.device, fc1_weight.dtype):
            return fc1_weight, fc1_bias, fc2_weight, activation
        originals = sources if sources is not None else (fc1_weight, fc1_bias, fc2_weight)
        folded = (_fold(t, f, like) for t, f, like in zip(originals, QUICK_GELU_FOLD, (fc1_weight, fc1_weight, fc2_weight)))
        return (*folded, "silu")

    # -- ops --------------------------------------------------------------------------------------

    def linear(self, x, weight, bias=None, *, activation=None, residual=None):
        _check_activation(activation)
        packed = onednn.is_prepacked(weight)
        if not packed and _rows(x) >= cpu_half.UPCAST_FROM_ROWS and self._upcasts(x.device, x.dtype):
            return upcast_linear(x, weight, bias, activation, residual, fp32_linear=self.linear)
        if packed or (self._onednn(x.device, x.dtype) and (activation is None or residual is None)):
            op = onednn.fused_linear()
            if residual is not None and activation is None:
                return op.binary(x, residual, weight, bias, "add")
            attr, algorithm = _ONEDNN_ACTIVATION.get(activation, ("none", None))
            y = op(x, weight, bias, attr, [], algorithm)
            if activation == "quick_gelu":
                y = _activate_(y, "quick_gelu")
            return y if residual is None else y.add_(residual)
        return torch_linear(x, weight, bias, activation, residual)

    def layer_norm(self, x, weight, bias, eps):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def add_layer_norm(self, x, residual, weight, bias, eps, *, return_sum=False):
        total = x + residual
        y = F.layer_norm(total, (total.shape[-1],), weight, bias, eps)
        return (y, total) if return_sum else y

    def linear_add_layer_norm(self, x, weight, bias, residual, ln_weight, ln_bias, eps, *, return_sum=False):
        total = self.linear(x, weight, bias, residual=residual)
        y = F.layer_norm(total, (total.shape[-1],), ln_weight, ln_bias, eps)
        return (y, total) if return_sum else y

    def attention(self, qkv, num_heads, layout, scale=None):
        if isinstance(layout, PackedLayout):
            # SDPA has no varlen form on CPU: attend over a padded grid. Attention is a small part of
            # the text tower's cost; the GEMMs around it stay unpadded.
            grid = layout.scatter_to_grid(qkv)
            return self.attention(grid, num_heads, layout.grid, scale).index_select(0, layout.grid_index)
        q, k, v = padded_qkv(qkv, num_heads, layout)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.additive_mask(qkv.dtype), scale=scale)
        return out.transpose(1, 2).reshape(layout.num_tokens, -1)

    def query_attention(self, q, kv, num_heads, layout, scale=None):
        if isinstance(layout, PackedLayout):
            return self.query_attention(q, layout.scatter_to_grid(kv), num_heads, layout.grid, scale)
        k, v = (t.transpose(1, 2) for t in padded_kv(kv, num_heads, layout))
        q = q.view(layout.batch, num_heads, 1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.additive_mask(q.dtype), scale=scale)
        return out.reshape(layout.batch, -1)
