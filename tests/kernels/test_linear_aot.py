"""Every autotune config of kernels.linear compiles for A100 (sm_80) and H100 (sm_90) and fits the
per-block shared memory there; the pruning's shared-memory estimate bounds the compiler's figure.

No GPU needed: tests/kernels/aot.py runs Triton's compiler down to a cubin in a child process. Each
config is compiled with the heaviest epilogue (bias + quick_gelu + residual), the most registers a
launch can need. The PTX must use tensor cores for 16-bit and TF32 operands and must not for IEEE
fp32. Register spills are reported, not asserted (a spill is a speed question for the benchmark, not a
correctness one); run with ``-rP`` or ``-s`` to see the table.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from altclip_fast.kernels import _runtime
from tests.kernels.aot import CAPABILITIES, AotJob, check_compiled, compile_many, kernel_path

# The module, not the op: altclip_fast.kernels.linear as an attribute is the function of that name.
linear_module = importlib.import_module("altclip_fast.kernels.linear")
_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_POINTERS = ("X", "W", "BIAS", "RESIDUAL", "Y")
_INTS = ("M", "N", "K", "stride_xm", "stride_wn", "stride_rm", "stride_ym", "M_BUCKET")


def _job(config, dtype: torch.dtype, precision: str, capability: int, even_k: bool) -> AotJob:
    signature = {p: f"*{_TRITON_TYPE[dtype]}" for p in _POINTERS}
    signature.update({n: "i32" for n in _INTS})
    constexprs = dict(config.kwargs, HAS_BIAS=True, ACTIVATION=linear_module.ACTIVATIONS["quick_gelu"],
                      HAS_RESIDUAL=True, INPUT_PRECISION=precision, EVEN_K=even_k)
    signature.update({n: "constexpr" for n in constexprs})
    # An even K (a multiple of 64) comes with 16-divisible row strides. A masked K loop serves any other K,
    # 3 x 14 x 14 = 588 say, whose rows are not 16-element aligned: the general case, declared as such.
    # (M, the token count, is whatever the batch makes it.)
    aligned = (*_POINTERS, "N", "stride_rm", "stride_ym") + (("K", "stride_xm", "stride_wn") if even_k else ())
    return AotJob(kernel_path(linear_module._linear_fwd), signature, constexprs, capability,
                  num_warps=config.num_warps, num_stages=config.num_stages, divisible_by_16=aligned)


def _name(config) -> str:
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}-w{config.num_warps}-s{config.num_stages}"


# Every config of every autotuner variant. The fast variants compile their hot path (K a multiple of
# 64, unmasked loads: AltCLIP's 1024 and 4096); IEEE fp32, the parity path for any shape, compiles the
# masked K loop. bf16 shares fp16's list and tile bytes, so fp16 proves the fit for both; bf16 still
# compiles for the two biggest tiles with the masked loop, as its MMA lowering differs.
CASES = []
for variant, (dtype, precision) in linear_module._TUNED_VARIANTS.items():
    for cap in CAPABILITIES:
        for config in linear_module.autotune_configs(dtype, precision, capability=cap):
            CASES.append((f"{variant}-{_name(config)}-sm{cap}", config, dtype, precision, cap, variant != "ieee"))
for cap in CAPABILITIES:
    for config in linear_module.autotune_configs(torch.bfloat16, capability=cap):
        if config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] == 128 * 256 and config.kwargs["BLOCK_K"] == 64:
            CASES.append((f"bf16-masked-{_name(config)}-sm{cap}", config, torch.bfloat16, "ieee", cap, False))
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def results():
    jobs = [_job(config, dtype, precision, cap, even_k) for _, config, dtype, precision, cap, even_k in CASES]
    return dict(zip(IDS, compile_many(jobs)))


def test_every_variant_has_configs():
    assert set(_runtime.ARCH_FAMILIES) == set(CAPABILITIES)  # every family the kernels tune for is compiled
    for name, (dtype, precision) in linear_module._TUNED_VARIANTS.items():
        for cap in CAPABILITIES:
            configs = linear_module.autotune_configs(dtype, precision, capability=cap)
            # IEEE fp32 (the exactness path) may come down to one config; the fast paths keep a choice.
            assert len(configs) >= (1 if name == "ieee" else 4), (name, cap)
            # EVEN_K (K % 64 == 0) stands for "no K tail" under every config the autotuner may pick.
            assert all(linear_module._MAX_BLOCK_K % c.kwargs["BLOCK_K"] == 0 for c in configs)
    assert linear_module._MAX_BLOCK_K % linear_module.INTERPRETER_CONFIG["BLOCK_K"] == 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compiles_and_fits(results, case, record_property):
    case_id, config, dtype, *_ = case
    r = results[case_id]
    check_compiled(r, record_property)
    k = config.kwargs
    estimate = linear_module._smem_estimate(k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], config.num_stages,
                                            dtype.itemsize)
    # The pruning budget is only sound if its estimate is an upper bound of what the compiler uses.
    assert r.shared_bytes <= estimate, f"estimate {estimate} B below the compiler's {r.shared_bytes} B"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tensor_cores_exactly_when_expected(results, case):
    """16-bit and TF32 products run on tensor cores (wgmma on sm_90, mma.sync on sm_80); IEEE fp32 must
    not, or it would silently be TF32 and lose fp32 parity."""
    case_id, _, dtype, precision, cap, _ = case
    r = results[case_id]
    assert r.error is None, r.error
    tensor_core = {90: "wgmma", 80: "mma.sync"}[cap]
    if dtype == torch.float32 and precision == "ieee":
        assert not {"wgmma", "mma.sync"} & set(r.ptx_features), r.describe()
    else:
        assert tensor_core in r.ptx_features, r.describe()
