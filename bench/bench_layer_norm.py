"""Benchmark kernels.add_layer_norm against torch's unfused add + F.layer_norm at AltCLIP shapes.

Reports effective bandwidth (bytes the op must move / time) in GB/s, as a share of the card's peak
HBM bandwidth and of a measured device-to-device copy, plus the speedup over torch. Two patterns:

- pre-LN (vision): ``h = h + attn_out; y = LN(h)``: reads x and residual, writes y and the sum.
- post-LN (text): ``y = LN(dense_out + bias + residual)``: reads x and residual, writes y.

Usage: ``python bench/bench_layer_norm.py [--dtype bf16|fp16|fp32] [--peak-gbs 3350]``.
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Spec-sheet HBM bandwidth in GB/s, matched against torch.cuda.get_device_name().
PEAK_GBS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 80 GB
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB
]

TOKENS = [8 * 257, 64 * 257, 256 * 257]  # ViT-L/14 images at 224 px: 257 tokens each
HIDDEN = 1024


def _peak_gbs(name: str) -> float | None:
    for key, gbs in PEAK_GBS:
        if key in name:
            return gbs
    return None


def _copy_gbs(do_bench) -> float:
    """Read + write bandwidth of a large device-to-device copy: what this card achieves in practice."""
    src = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--peak-gbs", type=float, default=None, help="override the card's peak HBM GB/s")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_layer_norm: no CUDA device available; nothing measured.")
        return 0

    import triton
    from triton.testing import do_bench

    from altclip_fast.kernels import add_layer_norm

    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name()
    peak = args.peak_gbs or _peak_gbs(name)
    copy = _copy_gbs(do_bench)

    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; dtype {args.dtype}")
    print(f"peak HBM: {peak if peak else 'unknown'} GB/s; measured copy: {copy:.0f} GB/s")
    print()
    print("| pattern | tokens x hidden | triton us | GB/s | % peak | % copy | torch us | torch GB/s | speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    elem = torch.empty((), dtype=dtype).element_size()
    for m in TOKENS:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, HIDDEN, device="cuda", dtype=dtype, generator=g)
        r = torch.randn(m, HIDDEN, device="cuda", dtype=dtype, generator=g)
        w = torch.randn(HIDDEN, device="cuda", dtype=dtype, generator=g)
        b = torch.randn(HIDDEN, device="cuda", dtype=dtype, generator=g)
        xb = torch.randn(HIDDEN, device="cuda", dtype=dtype, generator=g)
        cases = {
            # (fused call, torch baseline, tensors of m x hidden moved)
            "pre-LN (add, LN, keep sum)": (
                lambda: add_layer_norm(x, w, b, residual=r, return_sum=True),
                lambda: F.layer_norm(x + r, (HIDDEN,), w, b),
                4,
            ),
            "post-LN (x + bias + residual)": (
                lambda: add_layer_norm(x, w, b, residual=r, x_bias=xb),
                lambda: F.layer_norm(x + xb + r, (HIDDEN,), w, b),
                3,
            ),
        }
        for label, (fused, baseline, tensors) in cases.items():
            nbytes = tensors * m * HIDDEN * elem
            fused()  # compile outside the timing
            t_ms = do_bench(fused)
            base_ms = do_bench(baseline)
            gbs = nbytes / (t_ms * 1e-3) / 1e9
            base_gbs = nbytes / (base_ms * 1e-3) / 1e9
            pct_peak = f"{100 * gbs / peak:.0f}%" if peak else "n/a"
            print(f"| {label} | {m} x {HIDDEN} | {t_ms * 1e3:.1f} | {gbs:.0f} | {pct_peak} | {100 * gbs / copy:.0f}% "
                  f"| {base_ms * 1e3:.1f} | {base_gbs:.0f} | {base_ms / t_ms:.2f}x |")
    print()
    print("GB/s counts the bytes the fused op must move; torch's unfused pair moves more for the same work.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
