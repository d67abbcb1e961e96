"""Every autotune config of kernels.attention compiles for A100 (sm_80) and H100 (sm_90) and fits in
shared memory there. No GPU needed: tests/kernels/aot.py runs Triton's compiler down to a cubin.

Registers and spills are printed for every cubin (see them with ``pytest -rP`` or ``-s``) but spills are not
asserted: a small spill is a performance question for the benchmark, not a correctness one.
"""

from __future__ import annotations

import pytest
import torch

from altclip_fast.kernels.attention import _attention_fwd, _block_d, autotune_configs
from tests.kernels.aot import CAPABILITIES, AotJob, compile_many, kernel_path

_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_STRIDES = [f"stride_{t}{d}" for t in "qkvo" for d in "bsh"]


def _job(head_dim: int, dtype: torch.dtype, config, capability: int, *, has_mask: bool, varlen: bool) -> AotJob:
    """The specialisation a real launch compiles: aligned tensors, 16-divisible strides and sizes."""
    elem = _TRITON_TYPE[dtype]
    signature = {"Q": f"*{elem}", "K": f"*{elem}", "V": f"*{elem}", "Out": f"*{elem}",
                 "KeyMask": "*u8", "CuSeqlens": "*i32"}
    signature.update({name: "i32" for name in _STRIDES})
    signature.update({"stride_mb": "i32", "stride_ms": "i32", "n_heads": "i32", "seqlen_q": "i32",
                      "seqlen_k": "i32", "qk_scale": "fp32", "SEQ_BUCKET": "i32"})
    constexprs = {
        "HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "HAS_MASK": has_mask, "VARLEN": varlen,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "BLOCK_M": config.kwargs["BLOCK_M"], "BLOCK_N": config.kwargs["BLOCK_N"],
    }
    signature.update({name: "constexpr" for name in constexprs})
    aligned = ["Q", "K", "V", "Out", "KeyMask", "CuSeqlens", "stride_mb", "SEQ_BUCKET"]
    # head_dim 80 keeps rows 16-element aligned; odd head dims (20) do not.
    if head_dim % 16 == 0:
        aligned += [s for s in _STRIDES]
    return AotJob(
        kernel=kernel_path(_attention_fwd),
        signature=signature,
        constexprs=constexprs,
        capability=capability,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        divisible_by_16=tuple(aligned),
    )


@pytest.fixture(scope="module")
def aot_results():
    jobs = []
    # Autotune configs are chosen per tile class (head_dim <= 64 or up to 128, 2- or 4-byte elements), and
    # smaller head dims only shrink the tiles, so compiling each class's configs at its widest head_dim
    # (64, 128) proves fit for every head_dim the class serves. The masked padded variant carries the most
    # live state (mask loads and selects on every block), so it is the one measured.
    for head_dim in (64, 128):
        for dtype in (torch.float16, torch.float32):
            for cap in CAPABILITIES:
                for config in autotune_configs(head_dim, dtype, capability=cap):
                    jobs.append(_job(head_dim, dtype, config, cap, has_mask=True, varlen=False))
    # The other variants share those tiles; compile each once per capability with the class's largest
    # config to prove they lower too: bf16 (its own MMA path), padded head dims (20, 80: masked d lanes),
    # and the packed layout.
    for head_dim, dtype, varlen in ((64, torch.bfloat16, False), (20, torch.float16, False),
                                    (80, torch.float16, False), (64, torch.float16, True)):
        for cap in CAPABILITIES:
            config = autotune_configs(head_dim, dtype, capability=cap)[-1]
            jobs.append(_job(head_dim, dtype, config, cap, has_mask=not varlen, varlen=varlen))
    return compile_many(jobs)


def test_every_autotune_config_compiles_and_fits_shared_memory(aot_results):
    report = "\n".join(r.describe() for r in aot_results)
    print(report)
    failed = [r.describe() for r in aot_results if not r.fits]
    assert not failed, "configs that fail to compile or overflow shared memory:\n" + "\n".join(failed)


def test_16_bit_inputs_use_tensor_cores_and_async_copies(aot_results):
    """fp16/bf16 tiles must lower to tensor-core MMAs (wgmma on H100, mma.sync on A100), with K/V loads
    pipelined through cp.async where rows are aligned. fp32 with IEEE products must not use tensor cores
    (they would round the inputs to TF32)."""
    wrong = []
    for r in aot_results:
        ieee = r.job.signature["Q"] == "*fp32"
        mma = "wgmma" if r.job.capability == 90 else "mma.sync"
        # Rows of odd head dims (20) are not 16-byte aligned, so their loads cannot go through cp.async.
        aligned = r.job.constexprs["HEAD_DIM"] % 16 == 0
        expected = set() if ieee else {mma} | ({"cp.async"} if aligned else set())
        used = set(r.ptx_features) & {"wgmma", "mma.sync", "cp.async"}
        if (ieee and used & {"wgmma", "mma.sync"}) or not expected <= used:
            wrong.append(f"{r.job.describe()}: ptx uses {sorted(used)}, expected {sorted(expected) or 'no MMA'}")
    assert not wrong, "\n".join(wrong)


def test_spills_are_reported(aot_results):
    """cuobjdump ships with Triton's CUDA backend, so registers must be readable for every cubin; the
    spill figures themselves are printed, with the worst named in the report."""
    unknown = [r.job.describe() for r in aot_results if r.n_regs is None]
    assert not unknown, "no register usage read for:\n" + "\n".join(unknown)
    spilling = sorted((r for r in aot_results if r.stack_bytes), key=lambda r: -r.stack_bytes)
    print(f"{len(spilling)} of {len(aot_results)} cubins spill registers")
    for r in spilling[:10]:
        print("  spills:", r.describe())


def _describe(configs):
    return [(c.kwargs, c.num_warps, c.num_stages) for c in configs]


def test_compiled_head_dims_cover_every_head_dim():
    """The fixture compiles head_dim 64 and 128 only; that covers the rest because every head_dim <= 128
    gets the config list of one of them, with tiles no wider."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in range(1, 129):
            widest = 64 if head_dim <= 64 else 128
            assert _block_d(head_dim) <= widest
            for cap in CAPABILITIES:
                assert (_describe(autotune_configs(head_dim, dtype, capability=cap))
                        == _describe(autotune_configs(widest, dtype, capability=cap)))
