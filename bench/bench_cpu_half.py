"""Where a half-precision GEMM on CPU should run in fp32: the torch backend's two paths for one bf16
(or fp16) linear, timed side by side at BAAI/AltCLIP's GEMM shapes over a range of row counts.

- ``native``: oneDNN's half-precision GEMM on the weight pre-blocked by the prepare step (what a CPU
  with bf16 instructions runs; elsewhere oneDNN emulates it);
- ``fp32``: operands upcast exactly to fp32, MKL's fp32 GEMM, output rounded once (``cpu_half``;
  timed at every row count here, though the backend takes it only from ``UPCAST_FROM_ROWS`` rows on).

The ratio native/fp32 above 1 means the upcast wins. ``cpu_half.UPCAST_FROM_ROWS`` is the crossover
this prints on a CPU without bf16 instructions.

    python bench/bench_cpu_half.py [--dtype bf16] [--rows 8,16,32,64,128,257,2056]
"""

from __future__ import annotations

import argparse
import time

import torch

from altclip_fast.ops import cpu_half, get_ops
from altclip_fast.ops.torch_backend import upcast_linear

# (in, out): QKV, attention output, MLP up, MLP down of both towers (hidden 1024, FFN 4096).
SHAPES = ((1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024))


def seconds(fn, repeats: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--rows", default="8,16,32,64,128,257,2056")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    native = get_ops("torch", cpu_half_gemm="native")
    print(f"{args.dtype}, {torch.get_num_threads()} threads, native {args.dtype} GEMM instructions on this CPU: "
          f"{cpu_half.native_gemm(dtype)}, UPCAST_FROM_ROWS = {cpu_half.UPCAST_FROM_ROWS}")
    print(f"{'in x out':>12} {'rows':>6} {'native ms':>10} {'fp32 ms':>9} {'native/fp32':>12}")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for k, n in SHAPES:
            weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
            bias = torch.randn(n, generator=gen).to(dtype)
            prepared = native.prepare_weight(weight)
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, k, generator=gen).to(dtype)
                a = seconds(lambda: native.linear(x, prepared, bias), args.repeats)
                b = seconds(lambda: upcast_linear(x, weight, bias), args.repeats)
                print(f"{k:>5} x {n:<5} {rows:>6} {a * 1e3:>10.2f} {b * 1e3:>9.2f} {a / b:>11.2f}x")


if __name__ == "__main__":
    main()
