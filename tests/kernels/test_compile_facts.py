"""What the compiler says about every kernel config AltCLIP's launches can reach, for A100 (sm_80) and
H100/H200 (sm_90), checked without a GPU.

Each launch the model makes at BAAI/AltCLIP's shapes (``tests/kernels/compile_facts.py``; the model is
checked against that list in ``tests/altclip_fast/modeling/test_compile_facts_coverage.py``) is compiled under
every autotune config the launcher may pick there. From ptxas and the PTX come registers, spills,
shared memory, and which of wgmma, mma.sync and cp.async appear. A change that makes a kernel spill,
crowd the register ceiling or lose its tensor-core or pipelined path fails here the day it is made.

The table goes to ``$ALTCLIP_FAST_COMPILE_FACTS_TABLE`` (the GPU session sets it, so the facts of the
GPU machine's Triton come back with its figures), else next to pytest's temporary files; ``-s`` prints
where. Triton's wheel ships ptxas: without it this test fails, it does not skip.
"""

from __future__ import annotations

import os
import platform
import subprocess

import pytest
import triton

from tests.kernels import compile_facts
from tests.kernels.aot import SMEM_LIMIT_BYTES, compile_many

# ptxas may give a thread 255 registers. A config that uses nearly all of them spills at the next
# change of its epilogue; such configs are pruned in the kernels (their _AT_REGISTER_CEILING tables).
REGISTER_LIMIT = 255
REGISTER_MARGIN = 8

CASES = compile_facts.cases()


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    results = list(zip(CASES, compile_many([c.job for c in CASES])))
    header = (f"# Compile facts: Triton {triton.__version__}, {len(results)} configs of AltCLIP's launches "
              f"(host {platform.machine()}, no GPU needed)")
    path = (os.environ.get("ALTCLIP_FAST_COMPILE_FACTS_TABLE")
            or str(tmp_path_factory.mktemp("facts") / "compile-facts.md"))
    with open(path, "w") as f:
        f.write(compile_facts.table(results, header))
    print(f"compile facts table: {path}")
    return results


def _failures(facts, bad) -> str:
    rows = [f"{case.id}: {result.describe()}" for case, result in facts if bad(case, result)]
    return f"{len(rows)} of {len(facts)} configs:\n" + "\n".join(rows[:40])


def test_ptxas_ships_with_triton():
    """The facts come from ptxas; say so plainly when it is missing, rather than skipping."""
    from triton.backends.nvidia.compiler import get_ptxas

    for capability in (80, 90):
        try:
            path = get_ptxas(capability).path
        except Exception as exc:  # knobs raise when the binary is missing
            pytest.fail(f"Triton's ptxas for sm_{capability} is missing ({exc}); the compile facts need it")
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        assert version.returncode == 0 and "ptxas" in version.stdout.lower(), version.stderr


def test_the_launch_list_covers_both_towers_in_every_gpu_dtype():
    kinds = {(c.launch.kernel, c.launch.dtype) for c in CASES}
    if os.environ.get("ALTCLIP_FAST_COMPILE_FACTS") != "quick":
        assert kinds == {(k, d) for k in ("linear", "attention", "layer_norm") for d in compile_facts.DTYPES}
        assert {c.capability for c in CASES} == {80, 90}


def test_every_config_compiles(facts):
    assert not any(r.error for _, r in facts), _failures(facts, lambda c, r: r.error)


def test_no_config_spills(facts):
    assert all(r.spills is False for _, r in facts), _failures(facts, lambda c, r: r.spills is not False)


def test_registers_keep_a_margin_below_the_ceiling(facts):
    limit = REGISTER_LIMIT - REGISTER_MARGIN
    assert all(r.n_regs is not None and r.n_regs <= limit for _, r in facts), _failures(
        facts, lambda c, r: r.n_regs is None or r.n_regs > limit)


def test_shared_memory_fits_the_block_limit(facts):
    assert all(r.fits for _, r in facts), _failures(facts, lambda c, r: not r.fits)
    assert all(r.shared_bytes <= SMEM_LIMIT_BYTES[c.capability] for c, r in facts)


def _fma(case) -> bool:
    """IEEE fp32 products: FMA units on purpose (a tensor core would round the inputs to TF32)."""
    flags = dict(case.launch.flags)
    return flags.get("INPUT_PRECISION", flags.get("DOT_PRECISION")) == "ieee" and case.launch.dtype.itemsize == 4


def test_gemms_and_attention_use_tensor_cores(facts):
    """wgmma on sm_90 and mma.sync on sm_80 in every linear and attention config, except IEEE fp32, which
    must use neither."""
    def wrong(case, result):
        if case.launch.kernel == "layer_norm":
            return False
        used = {"wgmma", "mma.sync"} & set(result.ptx_features)
        if _fma(case):
            return bool(used)
        return used != {"wgmma" if case.capability >= 90 else "mma.sync"}

    assert not any(wrong(c, r) for c, r in facts), _failures(facts, wrong)


def test_operand_loads_are_pipelined(facts):
    """cp.async in every linear and attention config: AltCLIP's rows are 16-byte aligned (the patch
    embedding's too, padded), which is what lets Triton pipeline the loads."""
    def wrong(case, result):
        return case.launch.kernel != "layer_norm" and "cp.async" not in result.ptx_features

    assert not any(wrong(c, r) for c, r in facts), _failures(facts, wrong)
