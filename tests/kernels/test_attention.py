"""kernels.attention against reference.ops.attention / attention_varlen.

Without CUDA these run under Triton's interpreter on CPU tensors (tests/conftest.py), with shapes kept
small; with CUDA the same tests run on the GPU through the autotuned kernel. Low precision uses the
three-way rule: the kernel's error against the fp32 reference is at most twice plain torch's error
(``F.scaled_dot_product_attention`` in the same dtype) plus a small atol. GPU-only tests (bf16, AltCLIP
sizes, torch.compile, host syncs) are marked ``gpu`` and skip cleanly without CUDA.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from altclip_fast.kernels import attention
from altclip_fast.reference import ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# fp32 products are IEEE-exact (interpreter: numpy; GPU: input_precision="ieee"), so only summation order
# separates the kernel from the reference.
FP32_TOL = dict(atol=2e-5, rtol=1e-5)
LOW_ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


# --- inputs and measures ----------------------------------------------------------------------------------


def fused_qkv(batch, seq, heads, head_dim, dtype, seed=0):
    """q, k, v as the model makes them: strided views into one fused projection output
    ``[batch, seq, 3, heads, head_dim]``, not contiguous tensors."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=g).to(device=DEVICE, dtype=dtype)
    return qkv.unbind(2)


def packed_qkv(lengths, heads, head_dim, dtype, seed=0):
    """Packed q, k, v (views into a fused ``[total, 3, heads, head_dim]``) and int32 ``cu_seqlens``."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, generator=g).to(device=DEVICE, dtype=dtype)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    q, k, v = qkv.unbind(1)
    return q, k, v, torch.tensor(offsets, dtype=torch.int32, device=DEVICE)


def lengths_mask(lengths, seq):
    """``[batch, seq]`` bool mask with the first ``lengths[i]`` keys of row ``i`` real (right padding)."""
    return torch.arange(seq, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]


def reference_fp32(q, k, v, key_padding_mask=None, scale=None):
    """The fp32 answer for the (already rounded) inputs."""
    return ops.attention(q.float(), k.float(), v.float(), key_padding_mask, scale=scale)


def torch_same_dtype(q, k, v, key_padding_mask=None, scale=None):
    """Plain torch in the inputs' dtype: ``F.scaled_dot_product_attention``. Rows with no real key are
    zeroed, as the kernel and the reference define them (SDPA gives NaN there)."""
    attn_mask = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
    ).transpose(1, 2)
    if key_padding_mask is not None:
        any_key = key_padding_mask.bool().any(dim=1)[:, None, None, None]
        out = torch.where(any_key, out, torch.zeros_like(out))
    return out


def max_err(x, ref):
    return (x.float() - ref.float()).abs().max().item() if x.numel() else 0.0


def assert_close_to_reference(out, q, k, v, key_padding_mask=None, scale=None):
    """fp32: tight tolerance. fp16/bf16: the three-way rule against SDPA in the same dtype."""
    ref = reference_fp32(q, k, v, key_padding_mask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "kernel output has NaN/inf"
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref, **FP32_TOL)
        return
    kernel_err = max_err(out, ref)
    torch_err = max_err(torch_same_dtype(q, k, v, key_padding_mask, scale), ref)
    atol = LOW_ATOL[q.dtype]
    assert kernel_err <= 2 * torch_err + atol, f"kernel err {kernel_err:.3e} > 2 x torch {torch_err:.3e} + {atol}"


# --- padded layout -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [16, 20, 32, 64, 80, 128])
@pytest.mark.parametrize("seq", [1, 7, 77, 257])
def test_padded_fp32(seq, head_dim):
    q, k, v = fused_qkv(1, seq, 2, head_dim, torch.float32, seed=seq * 1000 + head_dim)
    assert_close_to_reference(attention(q, k, v), q, k, v)


def test_padded_fp32_text_max_length():
    """514, XLM-R's position limit, with a padding mask; one head keeps the interpreter quick."""
    q, k, v = fused_qkv(1, 514, 1, 64, torch.float32, seed=514)
    mask = lengths_mask([500], 514)
    assert_close_to_reference(attention(q, k, v, key_padding_mask=mask), q, k, v, mask)


@pytest.mark.parametrize("head_dim", [20, 64, 80])
@pytest.mark.parametrize("seq", [7, 77, 257])
def test_padded_fp16_three_way(seq, head_dim):
    q, k, v = fused_qkv(1, seq, 2, head_dim, torch.float16, seed=seq * 1000 + head_dim)
    assert_close_to_reference(attention(q, k, v), q, k, v)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.uint8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_key_padding_mask_ragged_and_fully_masked(dtype, mask_dtype):
    seq = 77
    q, k, v = fused_qkv(4, seq, 2, 32, dtype, seed=7)
    # Full, ragged (not a multiple of any block), length 1, and a sequence with no real key at all.
    mask = lengths_mask([seq, 45, 1, 0], seq).to(mask_dtype)
    out = attention(q, k, v, key_padding_mask=mask)
    assert_close_to_reference(out, q, k, v, mask)
    assert torch.equal(out[3], torch.zeros_like(out[3])), "rows without a real key must be zeros"


def test_key_padding_mask_with_holes():
    """Masked keys in the middle of a sequence and interleaved, not only right padding."""
    seq = 70
    q, k, v = fused_qkv(2, seq, 2, 16, torch.float32, seed=3)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(2, seq, generator=g) < 0.5).to(DEVICE)
    mask[1, 20:60] = False
    assert_close_to_reference(attention(q, k, v, key_padding_mask=mask), q, k, v, mask)


def test_strided_views_are_read_in_place():
    """Fused-QKV slices and a [batch, heads, seq, dim] tensor seen as [batch, seq, heads, dim]: neither is
    contiguous, and the kernel must read them through their strides."""
    q, k, v = fused_qkv(2, 33, 3, 32, torch.float32, seed=5)
    assert not q.is_contiguous()
    bhsd = torch.randn(2, 3, 33, 32, device=DEVICE).transpose(1, 2)
    for qq, kk, vv in ((q, k, v), (bhsd, k, v), (q, bhsd, bhsd)):
        out = attention(qq, kk, vv)
        assert out.is_contiguous()
        assert_close_to_reference(out, qq, kk, vv)


def test_query_and_key_lengths_may_differ():
    q = fused_qkv(2, 7, 2, 64, torch.float32, seed=1)[0]
    _, k, v = fused_qkv(2, 77, 2, 64, torch.float32, seed=2)
    mask = lengths_mask([77, 30], 77)
    assert_close_to_reference(attention(q, k, v, key_padding_mask=mask), q, k, v, mask)


def test_custom_scale():
    q, k, v = fused_qkv(1, 40, 2, 20, torch.float32, seed=11)
    assert_close_to_reference(attention(q, k, v, scale=0.37), q, k, v, scale=0.37)


def test_inputs_are_not_modified_and_output_is_new():
    q, k, v = fused_qkv(1, 9, 2, 16, torch.float16)
    before = [t.clone() for t in (q, k, v)]
    out = attention(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))
    assert out.is_contiguous() and out.dtype == torch.float16
    assert out.data_ptr() not in {t.data_ptr() for t in (q, k, v)}


def test_empty_batch_and_empty_sequence():
    for batch, seq in ((0, 5), (2, 0)):
        q, k, v = fused_qkv(batch, seq, 2, 16, torch.float32)
        out = attention(q, k, v)
        assert out.shape == q.shape


def test_no_keys_gives_zeros():
    q = fused_qkv(2, 5, 2, 16, torch.float32)[0]
    _, k, v = fused_qkv(2, 0, 2, 16, torch.float32)
    out = attention(q, k, v)
    assert torch.equal(out, torch.zeros_like(q))
    torch.testing.assert_close(out, reference_fp32(q, k, v))


# --- packed (varlen) layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_matches_reference(dtype):
    # Empty and length-1 sequences, ragged lengths, one longer than two interpreter blocks.
    lengths = [0, 1, 7, 77, 0, 33]
    q, k, v, cu = packed_qkv(lengths, 2, 64, dtype, seed=13)
    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))
    ref = ops.attention_varlen(q.float(), k.float(), v.float(), cu)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, **FP32_TOL)
    else:
        # Plain torch in fp16, one sequence at a time.
        torch_out = torch.zeros_like(q)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if e > s:
                torch_out[s:e] = torch_same_dtype(q[None, s:e], k[None, s:e], v[None, s:e])[0]
        kernel_err, torch_err = max_err(out, ref), max_err(torch_out, ref)
        assert kernel_err <= 2 * torch_err + LOW_ATOL[dtype], (kernel_err, torch_err)


def test_varlen_without_max_seqlen_reads_it_from_cu_seqlens():
    lengths = [5, 40, 12]
    q, k, v, cu = packed_qkv(lengths, 1, 32, torch.float32, seed=17)
    expected = attention(q, k, v, cu_seqlens=cu, max_seqlen=40)
    torch.testing.assert_close(attention(q, k, v, cu_seqlens=cu), expected, atol=0, rtol=0)


def test_varlen_equals_padded_with_mask():
    """The packed text path and the padded one give the same real-token outputs."""
    lengths = [9, 3, 20]
    q, k, v, cu = packed_qkv(lengths, 2, 20, torch.float32, seed=19)
    packed = attention(q, k, v, cu_seqlens=cu, max_seqlen=20)
    pad = torch.zeros(3, 20, 3, 2, 20, device=DEVICE)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        pad[i, : e - s] = torch.stack((q[s:e], k[s:e], v[s:e]), dim=1)
    mask = lengths_mask(lengths, 20)
    padded = attention(*pad.unbind(2), key_padding_mask=mask)
    torch.testing.assert_close(packed, padded[mask], **FP32_TOL)


def test_varlen_all_empty():
    q, k, v, cu = packed_qkv([0, 0], 2, 16, torch.float32)
    assert attention(q, k, v, cu_seqlens=cu, max_seqlen=0).shape == (0, 2, 16)
    q, k, v, cu = packed_qkv([], 2, 16, torch.float32)  # batch 0: cu_seqlens = [0]
    assert attention(q, k, v, cu_seqlens=cu).shape == (0, 2, 16)


# --- registration --------------------------------------------------------------------------------------------


def test_registered_op_is_what_the_function_calls():
    q, k, v = fused_qkv(1, 10, 1, 16, torch.float32)
    direct = torch.ops.altclip_fast.attention(q, k, v, None, None, 10, 0.25, False)
    torch.testing.assert_close(attention(q, k, v, scale=0.25), direct, atol=0, rtol=0)


# --- randomised shapes ---------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    seq_q=st.integers(1, 70),
    seq_k=st.integers(1, 70),
    heads=st.integers(1, 2),
    head_dim=st.integers(1, 128),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_padded_shapes(batch, seq_q, seq_k, heads, head_dim, masked, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, head_dim, generator=g).to(DEVICE)
    k, v = (torch.randn(batch, seq_k, heads, head_dim, generator=g).to(DEVICE) for _ in range(2))
    mask = (torch.rand(batch, seq_k, generator=g) < 0.7).to(DEVICE) if masked else None
    assert_close_to_reference(attention(q, k, v, key_padding_mask=mask), q, k, v, mask)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 50), min_size=1, max_size=4),
    head_dim=st.sampled_from([8, 20, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_random_varlen(lengths, head_dim, seed):
    q, k, v, cu = packed_qkv(lengths, 2, head_dim, torch.float32, seed=seed)
    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))
    torch.testing.assert_close(out, ops.attention_varlen(q, k, v, cu), **FP32_TOL)


# --- GPU only -------------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_altclip_shapes(dtype):
    """The vision tower's shape (257 tokens, 16 heads, head_dim 64) and padded texts, in bf16 and fp16."""
    q, k, v = fused_qkv(4, 257, 16, 64, dtype, seed=23)
    assert_close_to_reference(attention(q, k, v), q, k, v)
    q, k, v = fused_qkv(4, 77, 16, 64, dtype, seed=29)
    mask = lengths_mask([77, 8, 33, 0], 77)
    assert_close_to_reference(attention(q, k, v, key_padding_mask=mask), q, k, v, mask)


@gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [32, 80, 128])
@pytest.mark.parametrize("seq", [514, 1024])
def test_gpu_bf16_head_dims_and_long_sequences(seq, head_dim):
    q, k, v = fused_qkv(2, seq, 4, head_dim, torch.bfloat16, seed=seq + head_dim)
    assert_close_to_reference(attention(q, k, v), q, k, v)


@gpu
@needs_cuda
def test_gpu_varlen_bf16_texts():
    lengths = [8, 77, 1, 40, 0, 65]
    q, k, v, cu = packed_qkv(lengths, 16, 64, torch.bfloat16, seed=31)
    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=77)
    ref = ops.attention_varlen(q.float(), k.float(), v.float(), cu)
    torch_out = torch.zeros_like(q)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            torch_out[s:e] = torch_same_dtype(q[None, s:e], k[None, s:e], v[None, s:e])[0]
    assert max_err(out, ref) <= 2 * max_err(torch_out, ref) + LOW_ATOL[torch.bfloat16]


@gpu
@needs_cuda
def test_gpu_fp32_ieee_unless_tf32_allowed(monkeypatch):
    q, k, v = fused_qkv(1, 129, 2, 64, torch.float32, seed=37)
    ref = reference_fp32(q, k, v)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.testing.assert_close(attention(q, k, v), ref, **FP32_TOL)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    # TF32 keeps 10 mantissa bits: visibly less exact than IEEE, still close.
    torch.testing.assert_close(attention(q, k, v), ref, atol=2e-2, rtol=2e-2)


@gpu
@needs_cuda
def test_gpu_torch_compile_fullgraph_traces_the_op():
    q, k, v = fused_qkv(2, 77, 4, 64, torch.float16, seed=41)
    mask = lengths_mask([77, 50], 77)
    pq, pk, pv, cu = packed_qkv([8, 77, 20], 4, 64, torch.float16, seed=43)

    def both(q, k, v, mask, pq, pk, pv, cu):
        padded = attention(q, k, v, key_padding_mask=mask)
        packed = attention(pq, pk, pv, cu_seqlens=cu, max_seqlen=77)
        return padded * 2, packed + 1  # surrounding ops, so the op sits inside a real graph

    compiled = torch.compile(both, fullgraph=True)
    eager = both(q, k, v, mask, pq, pk, pv, cu)
    got = compiled(q, k, v, mask, pq, pk, pv, cu)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@gpu
@needs_cuda
def test_gpu_torch_compile_dynamic_lengths():
    """Text batches come padded to different lengths; with dynamic shapes the sequence length reaches the
    op as a SymInt and must still trace (the autotune bucket is computed with guards, not bit tricks)."""
    compiled = torch.compile(lambda q, k, v, m: attention(q, k, v, key_padding_mask=m), fullgraph=True, dynamic=True)
    for seq in (77, 50, 20):
        q, k, v = fused_qkv(2, seq, 4, 64, torch.float16, seed=seq)
        mask = lengths_mask([seq, seq // 2], seq)
        assert_close_to_reference(compiled(q, k, v, mask), q, k, v, mask)


@gpu
@needs_cuda
def test_gpu_launch_path_has_no_host_sync_with_max_seqlen():
    q, k, v, cu = packed_qkv([8, 77, 20], 16, 64, torch.float16, seed=47)
    mask = lengths_mask([77, 50, 3], 77)
    pq, pk, pv = fused_qkv(3, 77, 16, 64, torch.float16, seed=53)
    # Warm up first: autotuning benchmarks (and synchronises) on a new key, once.
    attention(q, k, v, cu_seqlens=cu, max_seqlen=77)
    attention(pq, pk, pv, key_padding_mask=mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention(q, k, v, cu_seqlens=cu, max_seqlen=77)
        attention(pq, pk, pv, key_padding_mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = fused_qkv(1, 12, 1, 20, torch.float32, seed=59)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, scale=1 / math.sqrt(20)), atol=0, rtol=0)


# --- the CUDA launch path, run by the interpreter --------------------------------------------------------------

_CPU_ONLY = pytest.mark.skipif(CUDA, reason="on CUDA the tests above already run the autotuned path")


@_CPU_ONLY
@pytest.mark.parametrize("head_dim", [64, 80])
def test_every_autotune_config_computes_the_right_answer(head_dim, monkeypatch):
    """The interpreter normally runs one 32 x 32 config. Here the op takes its CUDA branch instead, once per
    autotune config (each wrapped alone, so the autotuner has nothing to benchmark), so every block shape the
    GPU can pick is checked for ragged query and key tails: 130 = 128 + 2 = 2 x 64 + 2."""
    module = importlib.import_module("altclip_fast.kernels.attention")
    q, k, v = fused_qkv(2, 130, 1, head_dim, torch.float32, seed=61)
    mask = lengths_mask([130, 97], 130)
    refs = {False: reference_fp32(q, k, v), True: reference_fp32(q, k, v, mask)}
    runtime = importlib.import_module("altclip_fast.kernels._runtime")
    monkeypatch.setattr(runtime, "INTERPRETED", False)
    monkeypatch.setattr(runtime, "capability", lambda device: 90)  # the launcher asks; the stub decides
    configs = {str(c): c for cap in runtime.ARCH_FAMILIES for c in module.autotune_configs(head_dim, torch.float16,
                                                                                         capability=cap)}
    configs = list(configs.values())
    assert configs
    for config in configs:
        single = triton.autotune(configs=[config], key=["SEQ_BUCKET"])(module._attention_fwd)
        monkeypatch.setattr(module, "_tuned_kernel", lambda *_, kernel=single: kernel)
        for masked, ref in refs.items():
            out = torch.ops.altclip_fast.attention(q, k, v, mask if masked else None, None, 130, head_dim**-0.5, False)
            torch.testing.assert_close(out, ref, **FP32_TOL, msg=lambda m, c=config, mk=masked: f"{c} mask={mk}: {m}")
