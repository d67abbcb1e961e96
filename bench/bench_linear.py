"""Benchmark kernels.linear (GEMM + fused epilogue) against cuBLAS F.linear followed by torch's
epilogue ops, at AltCLIP shapes, in TFLOP/s (2*M*N*K flops; epilogue flops not counted).

Cases per token count M (8, 64 and 256 images of 257 tokens):
- QKV projection: [M, 1024] x [3072, 1024]^T + bias
- FFN up, text: + bias, exact GELU; FFN up, vision: + bias, quick_gelu
- FFN down: [M, 4096] x [1024, 4096]^T + bias + residual
The torch column is the unfused baseline (F.linear, then the activation / residual add as separate
ops); "cuBLAS alone" is F.linear with bias and nothing else, the GEMM's own speed.

Usage: ``python bench/bench_linear.py [--dtype bf16|fp16|fp32]``. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENS = [8 * 257, 64 * 257, 256 * 257]
HIDDEN, FFN = 1024, 4096

# name: (N, K, activation, residual)
CASES = {
    "QKV": (3 * HIDDEN, HIDDEN, None, False),
    "FFN up + gelu": (FFN, HIDDEN, "gelu", False),
    "FFN up + quick_gelu": (FFN, HIDDEN, "quick_gelu", False),
    "FFN down + residual": (HIDDEN, FFN, None, True),
}


def _torch_unfused(x, w, b, activation, residual):
    y = F.linear(x, w, b)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "quick_gelu":
        y = y * torch.sigmoid(1.702 * y)
    if residual is not None:
        y = y + residual
    return y


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_linear: no CUDA device available; nothing measured.")
        return 0

    import triton
    from triton.testing import do_bench

    from altclip_fast.kernels import linear

    dtype = DTYPES[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"dtype {args.dtype}; TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    print()
    print("| case | M x N x K | triton us | TFLOP/s | torch unfused us | TFLOP/s | cuBLAS alone us | speedup vs unfused |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in TOKENS:
        for label, (n, k, activation, with_residual) in CASES.items():
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
            w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k**0.5
            b = torch.randn(n, device="cuda", dtype=dtype, generator=g)
            r = torch.randn(m, n, device="cuda", dtype=dtype, generator=g) if with_residual else None

            def fused():
                return linear(x, w, b, activation=activation, residual=r)

            def unfused():
                return _torch_unfused(x, w, b, activation, r)

            fused()  # autotunes this (M bucket, N, K, epilogue) once, outside the timing
            t_ms = do_bench(fused)
            base_ms = do_bench(unfused)
            gemm_ms = do_bench(lambda: F.linear(x, w, b))
            flops = 2.0 * m * n * k
            print(f"| {label} | {m} x {n} x {k} | {t_ms * 1e3:.0f} | {flops / t_ms / 1e9:.0f} "
                  f"| {base_ms * 1e3:.0f} | {flops / base_ms / 1e9:.0f} | {gemm_ms * 1e3:.0f} | {base_ms / t_ms:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
