"""Benchmark kernels.attention against torch's F.scaled_dot_product_attention (flash backend).

Shapes: AltCLIP's vision tower (batches of 257-token images, 16 heads, head_dim 64), its text tower
(texts of 8..77 tokens: packed for our kernel; torch has no packed SDPA, so it runs the padded batch, with
the flash backend (which cannot mask, so it attends over pad keys: a speed bound, not a usable answer) and
with the masked efficient backend (what a correct padded batch costs in torch)), and long sequences
(1024, 4096 tokens).

TFLOP/s counts the useful work of exact attention, ``4 * heads * head_dim * sum(seq_q * seq_k)`` over the
real tokens (``4 * B * H * L * L * D`` for a full padded batch), for every row, so rows compare directly.

Usage: ``python bench/bench_attention.py [--dtype bf16|fp16] [--json results.json]``.
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEADS, HEAD_DIM = 16, 64


def _case_rows(dtype, do_bench):
    """Yield one result dict per benchmarked (case, implementation)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from altclip_fast.kernels import attention

    def timed(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    def sdpa(q, k, v, backend, attn_mask=None):
        # Our layout is [batch, seq, heads, dim]; SDPA wants [batch, heads, seq, dim]. The transposes are
        # free views, as they are for the kernel, so both read the same memory.
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask).transpose(1, 2)

    g = torch.Generator(device="cuda").manual_seed(0)

    def fused(batch, seq, heads=HEADS, head_dim=HEAD_DIM):
        qkv = torch.randn(batch, seq, 3, heads, head_dim, device="cuda", dtype=dtype, generator=g)
        return qkv.unbind(2)

    # Padded, unmasked: images and long sequences.
    for name, batch, seq, head_dim in (
        ("vision 257 tok", 32, 257, HEAD_DIM),
        ("vision 257 tok", 256, 257, HEAD_DIM),
        ("long 1024", 16, 1024, HEAD_DIM),
        ("long 4096", 4, 4096, HEAD_DIM),
        ("long 4096 d128", 4, 4096, 128),
    ):
        q, k, v = fused(batch, seq, head_dim=head_dim)
        flops = 4 * batch * HEADS * seq * seq * head_dim
        ours = attention(q, k, v)
        ref = sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)
        err = (ours.float() - ref.float()).abs().max().item()
        shape = f"B{batch} L{seq} H{HEADS} D{head_dim}"
        yield dict(case=name, shape=shape, impl="kernels.attention", ms=timed(lambda: attention(q, k, v)),
                   flops=flops, max_abs_diff_vs_sdpa=err)
        yield dict(case=name, shape=shape, impl="sdpa flash",
                   ms=timed(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)), flops=flops)

    # Texts of 8..77 tokens.
    for n_texts in (64, 512):
        lengths = torch.randint(8, 78, (n_texts,), generator=torch.Generator().manual_seed(n_texts)).tolist()
        max_len = max(lengths)
        flops = 4 * HEADS * HEAD_DIM * sum(n * n for n in lengths)
        shape = f"{n_texts} texts, {sum(lengths)} tok, pad {max_len}"
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        pq, pk, pv = (torch.randn(sum(lengths), HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
                      for _ in range(3))
        q, k, v = fused(n_texts, max_len)
        mask = torch.arange(max_len, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
        yield dict(case="texts packed", shape=shape, impl="kernels.attention varlen", flops=flops,
                   ms=timed(lambda: attention(pq, pk, pv, cu_seqlens=cu, max_seqlen=max_len)))
        yield dict(case="texts padded+mask", shape=shape, impl="kernels.attention mask", flops=flops,
                   ms=timed(lambda: attention(q, k, v, key_padding_mask=mask)))
        yield dict(case="texts padded, no mask", shape=shape, impl="sdpa flash (ignores padding)", flops=flops,
                   ms=timed(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)))
        sdpa_mask = mask[:, None, None, :]
        yield dict(case="texts padded+mask", shape=shape, impl="sdpa efficient + mask", flops=flops,
                   ms=timed(lambda: sdpa(q, k, v, SDPBackend.EFFICIENT_ATTENTION, sdpa_mask)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--json", metavar="PATH", help="also write the rows, device and versions as JSON")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU; none is available here, so nothing was measured.")
        return 0

    import triton
    from triton.testing import do_bench

    dtype = DTYPES[args.dtype]
    device = torch.cuda.get_device_name()
    header = f"device: {device}; torch {torch.__version__}, triton {triton.__version__}; dtype {args.dtype}"
    print(header)
    print()
    print("| case | shape | impl | ms | TFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for row in _case_rows(dtype, do_bench):
        row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
        rows.append(row)
        note = f" (max |diff| vs sdpa {row['max_abs_diff_vs_sdpa']:.1e})" if "max_abs_diff_vs_sdpa" in row else ""
        print(f"| {row['case']} | {row['shape']} | {row['impl']}{note} | {row['ms']:.3f} | {row['tflops']:.1f} |")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                       "dtype": args.dtype, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
