"""Every launch config the add_layer_norm heuristic can pick (hidden sizes 1..8192) compiles for A100
(sm_80) and H100 (sm_90), fits the per-block shared memory there, and does not spill.

No GPU needed: tests/kernels/aot.py runs Triton's compiler down to a cubin in a child process. The
no-spill assertion guards the heuristic's design (at most 16 fp32 values per thread per tensor); run
with ``-rP`` or ``-s`` to see the register table.
"""

from __future__ import annotations

import pytest

import altclip_fast.kernels as kernels  # noqa: F401  (imports the kernel modules the way the launcher sees them)
from altclip_fast.kernels.layer_norm import MAX_HIDDEN, _add_layer_norm_fwd, launch_config
from tests.kernels.aot import CAPABILITIES, AotJob, check_compiled, compile_many, kernel_path

# Distinct configs over every supported hidden size, smallest first.
CONFIGS = sorted({tuple(sorted(launch_config(n).items())) for n in range(1, MAX_HIDDEN + 1)},
                 key=lambda c: dict(c)["BLOCK_N"])

# Worst cases for registers: every input present, and both the model's mixed case (fp16 activations,
# fp32 parameters) and all-fp32 storage (32-bit loads hold twice the raw bits of fp16 ones).
VARIANTS = {
    "fp16-act-fp32-param": dict(X="*fp16", X_BIAS="*fp32", RESIDUAL="*fp16", W="*fp32", B="*fp32", Y="*fp16",
                                SUM="*fp16"),
    "fp32": dict(X="*fp32", X_BIAS="*fp32", RESIDUAL="*fp32", W="*fp32", B="*fp32", Y="*fp32", SUM="*fp32"),
}


def _job(config: dict, pointers: dict, capability: int) -> AotJob:
    signature = dict(pointers)
    signature.update({n: "i32" for n in ("M", "N", "stride_x", "stride_r", "stride_y", "stride_s")})
    signature["eps"] = "fp32"
    constexprs = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"],
                  "HAS_X_BIAS": True, "HAS_RESIDUAL": True, "HAS_BIAS": True, "STORE_SUM": True}
    signature.update({n: "constexpr" for n in constexprs})
    # What a launch on aligned tensors with a 16-divisible hidden size (AltCLIP's 1024) specialises.
    aligned = (*pointers, "N", "stride_x", "stride_r", "stride_y", "stride_s")
    return AotJob(kernel_path(_add_layer_norm_fwd), signature, constexprs, capability,
                  num_warps=config["num_warps"], num_stages=1, divisible_by_16=aligned)


CASES = [(dict(c), v, cap) for c in CONFIGS for v in VARIANTS for cap in CAPABILITIES]
IDS = [f"N{c['BLOCK_N']}-M{c['BLOCK_M']}-w{c['num_warps']}-{v}-sm{cap}" for c, v, cap in CASES]


@pytest.fixture(scope="module")
def results():
    jobs = [_job(c, VARIANTS[v], cap) for c, v, cap in CASES]
    return dict(zip(IDS, compile_many(jobs)))


def test_heuristic_configs_cover_the_range():
    assert [dict(c)["BLOCK_N"] for c in CONFIGS] == [2**i for i in range(14)]  # 1 .. 8192


@pytest.mark.parametrize("case_id", IDS)
def test_compiles_and_fits(results, case_id, record_property):
    r = results[case_id]
    check_compiled(r, record_property)
    if r.stack_bytes is not None:  # None: this Triton ships no cuobjdump, spills are not visible
        assert r.stack_bytes == 0, f"register spills: {r.describe()}"
