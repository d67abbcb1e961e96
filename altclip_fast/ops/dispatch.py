"""Op dispatch for the fast model, in one place.

The encoder needs four operations; each backend implements them the fastest correct way it can:

- ``linear(x, weight, bias, activation=, residual=)``: ``act(x @ weight.T + bias) (+ residual)``;
- ``layer_norm(x, weight, bias, eps)`` and ``add_layer_norm(x, residual, weight, bias, eps, return_sum=)``;
- ``linear_add_layer_norm(x, weight, bias, residual, ln_weight, ln_bias, eps, return_sum=)``:
  ``LayerNorm(x @ weight.T + bias + residual)`` and, on request, the pre-norm sum (the residual
  stream of a pre-LN layer). Post-LN and pre-LN layers both end their sub-blocks with it;
- ``attention(qkv, num_heads, layout, scale)``: softmax attention over the output of a fused QKV
  projection ``[tokens, 3 * hidden]``, for a padded batch or for packed (unpadded) sequences.
- ``query_attention(q, kv, num_heads, layout, scale)``: the same for one query per sequence
  (``q`` ``[batch, hidden]``) over its sequence's keys and values (``kv`` ``[tokens, 2 * hidden]``): a
  last layer whose only output is the pooled token needs no other queries.

Backends:

- ``"triton"``: the kernels of the ``kernels`` package. The default for CUDA tensors. On CPU it runs
  them under Triton's interpreter (slow, for tests that drive the whole model through the kernels).
- ``"torch"``: plain torch. The default for CPU tensors. On CPU it uses oneDNN's fused
  linear + bias + activation / + residual (``torch.ops.mkldnn._linear_pointwise``, what inductor
  emits for the same pattern, each weight pre-blocked once for it) for bf16/fp16 where a probe shows
  it works, MKL's GEMM with in-place
  epilogues for fp32, and ``F.scaled_dot_product_attention``.

On CUDA the Triton backend runs each GEMM shape through whichever of the Triton kernel (fused epilogue)
and torch's GEMM (cuBLAS, epilogue in torch) measured faster for it on this GPU: see ``gemm_choice``.
``ALTCLIP_FAST_GEMM=triton`` or ``=torch`` forces one path; attention and LayerNorm stay kernels.

``ALTCLIP_FAST_BACKEND`` (``auto``, ``torch`` or ``triton``) sets the default; an explicit
``backend=`` argument wins over it. ``kernels`` is imported only when the Triton backend is used, so
the torch path never needs Triton.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .gemm_choice import MeasuredChoice, gemm_mode

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "QUICK_GELU_ALPHA",
    "PaddedLayout",
    "PackedLayout",
    "resolve_backend",
    "get_ops",
    "explicit_attention",
]

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "ALTCLIP_FAST_BACKEND"
# quick_gelu(x) = x * sigmoid(QUICK_GELU_ALPHA * x), as CLIP defines it.
QUICK_GELU_ALPHA = 1.702
ACTIVATIONS = (None, "gelu", "quick_gelu", "silu")


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """The backend that runs ops on ``device``: the argument, else ``$ALTCLIP_FAST_BACKEND``, else auto
    (Triton for CUDA, torch otherwise)."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        where = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{where} must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return name


@functools.cache
def get_ops(backend: str) -> "TorchOps | TritonOps":
    """The op set of a resolved backend name (``"torch"`` or ``"triton"``)."""
    if backend == "torch":
        return TorchOps()
    if backend == "triton":
        return TritonOps()
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")


# ----------------------------------------------------------------------------------------------
# Attention layouts. A layout says how the token rows of a [tokens, features] matrix form sequences.


@dataclass
class PaddedLayout:
    """``batch * seqlen`` token rows, sequence-major. ``key_padding_mask`` ``[batch, seqlen]`` marks real
    tokens (True); None means every token is real. Masked keys get transformers' additive mask
    (``finfo.min``), so even a fully masked row gives transformers' answer."""

    batch: int
    seqlen: int
    key_padding_mask: torch.Tensor | None = None
    _additive: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.batch * self.seqlen

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``[batch, 1, 1, seqlen]``: 0 for real keys, ``finfo(dtype).min`` for padding."""
        if self.key_padding_mask is None:
            return None
        if dtype not in self._additive:
            keep = self.key_padding_mask.bool()[:, None, None, :]
            zero = torch.zeros((), dtype=dtype, device=keep.device)
            self._additive[dtype] = torch.where(keep, zero, torch.finfo(dtype).min)
        return self._additive[dtype]


@dataclass
class PackedLayout:
    """Sequences packed back to back without padding (FlashAttention's varlen layout).

    ``cu_seqlens`` (int32, ``[batch + 1]``) bounds sequence ``i`` to rows ``cu_seqlens[i]:cu_seqlens[i+1]``;
    ``max_seqlen`` is an upper bound on their lengths. ``grid_index`` places each packed row in a
    ``[batch, grid_seqlen]`` grid, for backends that attend over a padded grid.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    grid_index: torch.Tensor
    grid: PaddedLayout
    _scratch: dict = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return self.grid.batch

    @property
    def num_tokens(self) -> int:
        return self.grid_index.numel()

    def scatter_to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` placed in a zero-padded ``[batch * grid_seqlen, features]`` grid. The grid is reused
        by every layer of a forward: each call overwrites the same real positions and the padding
        stays zero (padded keys must hold finite values: masked-out weights are 0, and 0 * NaN is NaN)."""
        key = (rows.dtype, rows.device, rows.shape[-1])
        grid = self._scratch.get(key)
        if grid is None:
            grid = self._scratch[key] = rows.new_zeros((self.grid.num_tokens, rows.shape[-1]))
        return grid.index_copy_(0, self.grid_index, rows)

    @classmethod
    def from_mask(cls, keep: torch.Tensor) -> "PackedLayout":
        """The packing of the True entries of ``keep`` ``[batch, seqlen]``, in row-major order."""
        batch, seqlen = keep.shape
        lengths = keep.sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        grid_index = keep.reshape(-1).nonzero().squeeze(1)
        return cls(cu_seqlens, seqlen, grid_index, PaddedLayout(batch, seqlen, keep))


def _padded_qkv(qkv: torch.Tensor, num_heads: int, layout: PaddedLayout):
    """Views ``q, k, v`` ``[batch, heads, seq, head_dim]`` of a fused projection, without copies."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return qkv.view(layout.batch, layout.seqlen, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _padded_kv(kv: torch.Tensor, num_heads: int, layout: PaddedLayout):
    """Views ``k, v`` ``[batch, seq, heads, head_dim]`` of a fused key/value projection ``[tokens, 2 * hidden]``."""
    head_dim = kv.shape[-1] // (2 * num_heads)
    return kv.view(layout.batch, layout.seqlen, 2, num_heads, head_dim).unbind(2)


def explicit_attention(qkv: torch.Tensor, num_heads: int, layout: PaddedLayout, scale: float | None = None):
    """Attention that materialises the probabilities, for ``output_attentions``: it costs an
    ``[batch, heads, seq, seq]`` tensor per layer and runs at plain-matmul speed on every backend.

    Returns ``(out [tokens, hidden], probs [batch, heads, seq, seq])`` computed as transformers'
    eager attention does (scores in the input dtype, softmax in fp32).
    """
    q, k, v = _padded_qkv(qkv, num_heads, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = layout.additive_mask(scores.dtype)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qkv.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(layout.num_tokens, -1), probs


# ----------------------------------------------------------------------------------------------
# torch backend


def _mkldnn_linear():
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


@functools.cache
def mkldnn_linear_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused linear runs and agrees with ``F.linear`` for ``dtype`` on this CPU.

    It is a private torch op (inductor's CPU lowering of linear + pointwise): a torch build without
    oneDNN, or a CPU without the dtype's instructions, falls back to ``F.linear``.
    """
    op = _mkldnn_linear()
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=gen).to(dtype)
    w = torch.randn(8, 24, generator=gen).to(dtype)
    b = torch.randn(8, generator=gen).to(dtype)
    r = torch.randn(5, 8, generator=gen).to(dtype)
    try:
        with torch.no_grad():
            plain = op(x, w, b, "none", [], None)
            silu = op(x, w, b, "swish", [], None)
            gelu = op(x, w, b, "gelu", [], "none")
            added = op.binary(x, r, w, b, "add")
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    ref = F.linear(x.double(), w.double(), b.double())
    tol = 1e-4 if dtype == torch.float32 else 0.1
    return all(
        torch.allclose(got.double(), want, atol=tol, rtol=tol)
        for got, want in ((plain, ref), (silu, F.silu(ref)), (gelu, F.gelu(ref)), (added, ref + r.double()))
    )


@functools.cache
def mkldnn_prepack_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused linear accepts a weight pre-blocked by ``_reorder_linear_weight`` for
    ``dtype`` and gives bit-identical results (a private op, like the fused linear itself)."""
    reorder = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
    if reorder is None or not mkldnn_linear_works(dtype):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=gen).to(dtype)
    w = torch.randn(8, 24, generator=gen).to(dtype)
    try:
        with torch.no_grad():
            return torch.equal(_mkldnn_linear()(x, reorder(w, 5), None, "none", [], None),
                               _mkldnn_linear()(x, w, None, "none", [], None))
    except (RuntimeError, NotImplementedError):
        return False


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change outside inference)
        return -1


def _prepacked(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """oneDNN's blocked copy of ``weight``, made on first use and kept on the weight itself (on its base
    tensor for a view, such as the patch embedding's 2-D view of its conv weight, so a fresh view per
    call still hits the cache). It is remade after an in-place change, which bumps the version counter
    that views share with their base. A plain-layout weight is re-blocked inside every GEMM call:
    packing once measured 2-30% faster GEMMs at AltCLIP shapes, for one more copy of each weight."""
    owner = weight if weight._base is None else weight._base
    key = (tuple(weight.shape), weight.stride(), weight.storage_offset())
    cache = getattr(owner, "_altclip_fast_prepacked", None)
    if cache is None:
        cache = owner._altclip_fast_prepacked = {}
    hit = cache.get(key)
    if hit is not None and hit[0] == _version(weight):
        return hit[1]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    cache[key] = (_version(weight), packed)
    return packed


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


def _torch_linear(x, weight, bias, activation, residual):
    """The GEMM in torch (cuBLAS fuses the bias on CUDA), then the activation and residual in place."""
    y = _activate_(F.linear(x, weight, bias), activation)
    return y if residual is None else y.add_(residual)


class TorchOps:
    """Plain torch ops; on CPU, oneDNN's fused GEMM epilogues where they work."""

    name = "torch"

    def fused_gemm(self, device: torch.device, dtype: torch.dtype) -> bool:
        # fp32 stays on MKL: its GEMMs measured 10-30% faster than oneDNN's at AltCLIP shapes here,
        # more than the epilogue fusion saves. bf16/fp16 GEMMs are as fast in oneDNN, so fusing wins.
        return device.type == "cpu" and dtype != torch.float32 and mkldnn_linear_works(dtype)

    def folds_quick_gelu(self, device: torch.device, dtype: torch.dtype) -> bool:
        """oneDNN fuses SiLU but not quick_gelu. quick_gelu(y) = silu(a*y)/a (a = 1.702), so a model
        whose fc1 is scaled by ``a`` and fc2's weight by ``1/a`` runs its MLP as two fused GEMMs."""
        return self.fused_gemm(device, dtype)

    def linear(self, x, weight, bias=None, *, activation=None, residual=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if self.fused_gemm(x.device, x.dtype) and (activation is None or residual is None):
            op = _mkldnn_linear()
            if mkldnn_prepack_works(x.dtype):
                weight = _prepacked(weight, x.numel() // x.shape[-1])
            if residual is not None:
                return op.binary(x, residual, weight, bias, "add")
            attr, algorithm = {None: ("none", None), "gelu": ("gelu", "none"), "silu": ("swish", None)}.get(
                activation, ("none", None)
            )
            y = op(x, weight, bias, attr, [], algorithm)
            return _activate_(y, "quick_gelu") if activation == "quick_gelu" else y
        return _torch_linear(x, weight, bias, activation, residual)

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
        q, k, v = _padded_qkv(qkv, num_heads, layout)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.additive_mask(qkv.dtype), scale=scale)
        return out.transpose(1, 2).reshape(layout.num_tokens, -1)

    def query_attention(self, q, kv, num_heads, layout, scale=None):
        if isinstance(layout, PackedLayout):
            return self.query_attention(q, layout.scatter_to_grid(kv), num_heads, layout.grid, scale)
        k, v = (t.transpose(1, 2) for t in _padded_kv(kv, num_heads, layout))
        q = q.view(layout.batch, num_heads, 1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.additive_mask(q.dtype), scale=scale)
        return out.reshape(layout.batch, -1)


# ----------------------------------------------------------------------------------------------
# Triton backend


def _import_kernels():
    """Import ``kernels`` on first use. On a machine without CUDA the kernels can only run under
    Triton's interpreter, whose switch is read when the kernels are defined: set it first."""
    if "altclip_fast.kernels" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from .. import kernels
    except ImportError as exc:
        raise ImportError(
            f"the triton backend needs the 'kernels' package and Triton ({exc}); "
            f"use backend='torch' or {ENV_VAR}=torch"
        ) from exc
    return kernels


class TritonOps:
    """The fused Triton kernels (``kernels`` package)."""

    name = "triton"

    def __init__(self):
        self._kernels = None
        self.gemm_paths = MeasuredChoice()  # per-shape GEMM path on CUDA, measured on first use

    @property
    def kernels(self):
        if self._kernels is None:
            self._kernels = _import_kernels()
        return self._kernels

    def _check_device(self, x):
        if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "the triton backend got CPU tensors but Triton's interpreter is off: set TRITON_INTERPRET=1 "
                f"before importing kernels, or use {ENV_VAR}=torch"
            )

    def fused_gemm(self, device, dtype) -> bool:
        return False

    def folds_quick_gelu(self, device, dtype) -> bool:
        return False  # the linear kernel has quick_gelu in its epilogue

    def _gemm(self, x, weight, bias=None, *, activation=None, residual=None):
        """``act(x @ weight.T + bias) (+ residual)`` through the Triton kernel or torch, per ``gemm_choice``."""
        path = gemm_mode()
        if path == "auto":
            # Under the interpreter (CPU) the kernels are what this backend exists to run.
            path = self._measured_path(x, weight, bias, activation, residual) if x.is_cuda else "triton"
        if path == "torch":
            return _torch_linear(x, weight, bias, activation, residual)
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
            "torch": lambda: _torch_linear(x, weight, bias, activation, residual),
        }, default="triton")

    def linear(self, x, weight, bias=None, *, activation=None, residual=None):
        self._check_device(x)
        if activation == "silu":
            raise ValueError("the triton backend runs quick_gelu itself; the model must not fold it into silu")
        return self._gemm(x, weight, bias, activation=activation, residual=residual)

    def layer_norm(self, x, weight, bias, eps):
        self._check_device(x)
        return self.kernels.add_layer_norm(x, weight, bias, eps=eps)

    def add_layer_norm(self, x, residual, weight, bias, eps, *, return_sum=False):
        self._check_device(x)
        return self.kernels.add_layer_norm(x, weight, bias, residual=residual, eps=eps, return_sum=return_sum)

    def linear_add_layer_norm(self, x, weight, bias, residual, ln_weight, ln_bias, eps, *, return_sum=False):
        self._check_device(x)
        # The bias goes into the LayerNorm kernel's x_bias: one pass fewer over the GEMM output.
        y = self._gemm(x, weight)
        return self.kernels.add_layer_norm(
            y, ln_weight, ln_bias, residual=residual, x_bias=bias, eps=eps, return_sum=return_sum
        )

    def attention(self, qkv, num_heads, layout, scale=None):
        self._check_device(qkv)
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

    def query_attention(self, q, kv, num_heads, layout, scale=None):
        self._check_device(q)
        if isinstance(layout, PackedLayout):
            return self.query_attention(q, layout.scatter_to_grid(kv), num_heads, layout.grid, scale)
        k, v = _padded_kv(kv, num_heads, layout)
        q = q.view(layout.batch, 1, num_heads, -1)
        return self.kernels.attention(q, k, v, key_padding_mask=layout.key_padding_mask, scale=scale).reshape(
            layout.batch, -1
        )
