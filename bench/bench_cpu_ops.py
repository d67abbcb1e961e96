"""pytest-benchmark: the CPU op path of the fast model against plain torch, at BAAI/AltCLIP shapes.

Each fused op the encoder layer calls through ``altclip_fast.ops`` (torch backend) is timed next
to the unfused torch sequence transformers runs for the same math, one ViT-L/14 batch of 8 images
(2056 token rows, hidden 1024, FFN 4096). It shows where the CPU gains of the end-to-end benchmark
come from; the GPU counterparts are bench_attention.py, bench_layer_norm.py and bench_linear.py.

    python -m pytest bench/bench_cpu_ops.py --benchmark-only --benchmark-group-by=param:case

Not collected by the test suite (it lives outside tests/): these are timings, not checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from altclip_fast.ops import PaddedLayout, get_ops

ROWS, HIDDEN, FFN, HEADS, IMAGES, TOKENS = 8 * 257, 1024, 4096, 16, 8, 257
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def tensors(dtype, *shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=gen) * s[-1] ** -0.5).to(dtype) for s in shapes]


def cases(dtype):
    """name -> (fast callable, torch baseline callable), both computing the same thing."""
    ops = get_ops("torch")
    x, res = tensors(dtype, (ROWS, HIDDEN), (ROWS, HIDDEN))
    w1, b1, w2, b2, wqkv, bqkv, wo, bo = tensors(
        dtype, (FFN, HIDDEN), (FFN,), (HIDDEN, FFN), (HIDDEN,), (3 * HIDDEN, HIDDEN), (3 * HIDDEN,), (HIDDEN, HIDDEN),
        (HIDDEN,), seed=1,
    )
    ln_w, ln_b = torch.ones(HIDDEN, dtype=dtype), torch.zeros(HIDDEN, dtype=dtype)
    h = F.linear(x, w1, b1)
    qkv = F.linear(x, wqkv, bqkv)
    layout = PaddedLayout(IMAGES, TOKENS)
    # Time what the model runs: the weights as the backend's prepare step derives them at load (in bf16,
    # pre-blocked for oneDNN, with quick_gelu folded into SiLU).
    f1, fb1, f2, act = ops.prepare_mlp(w1, b1, w2, "quick_gelu")
    f1, f2, fqkv, fo = (ops.prepare_weight(w) for w in (f1, f2, wqkv, wo))

    def sdpa_baseline():
        q, k, v = qkv.view(IMAGES, TOKENS, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(ROWS, HIDDEN)

    return {
        "fc1+quick_gelu": (lambda: ops.linear(x, f1, fb1, activation=act), lambda: quick_gelu(F.linear(x, w1, b1))),
        "fc2+residual": (lambda: ops.linear(h, f2, b2, residual=res), lambda: F.linear(h, w2, b2) + res),
        "out_proj+add+layer_norm": (
            lambda: ops.linear_add_layer_norm(x, fo, bo, res, ln_w, ln_b, 1e-5, return_sum=True),
            lambda: (lambda s: (F.layer_norm(s, (HIDDEN,), ln_w, ln_b, 1e-5), s))(F.linear(x, wo, bo) + res),
        ),
        "qkv (fused vs 3 GEMMs)": (
            lambda: ops.linear(x, fqkv, bqkv),
            lambda: [F.linear(x, w, b) for w, b in zip(wqkv.chunk(3), bqkv.chunk(3))],
        ),
        "attention 257 tokens": (lambda: ops.attention(qkv, HEADS, layout, (HIDDEN // HEADS) ** -0.5), sdpa_baseline),
    }


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("case", list(cases(torch.float32)))
@pytest.mark.parametrize("impl", ["altclip_fast", "torch"])
def test_cpu_op(benchmark, dtype_name, case, impl):
    fast, baseline = cases(DTYPES[dtype_name])[case]
    benchmark.group = f"{case} {dtype_name}"
    with torch.inference_mode():
        benchmark.pedantic(fast if impl == "altclip_fast" else baseline, rounds=5, warmup_rounds=1)
