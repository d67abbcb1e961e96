"""Ahead-of-time compilation of Triton kernels for real GPUs, without a GPU.

Kernel tests use this to prove that every config a launcher can pick compiles for A100 (sm_80) and
H100 (sm_90), and fits the per-block shared-memory limit there; it also reports registers and
spills. ``triton.compile`` with a ``GPUTarget`` needs no driver: it runs the whole pipeline down to a
cubin with the ``ptxas`` shipped in Triton's wheel.

The interpreter trick. Tests set ``TRITON_INTERPRET=1`` before importing ``kernels``, so each
``@triton.jit`` kernel there is an ``InterpretedFunction`` that ``triton.compile`` cannot take. Two
in-process fixes look tempting and both fail: wrapping ``kernel.fn`` in a fresh ``JITFunction``
works only until an interpreted kernel has run in the process, because the interpreter patches
``triton.language`` while it runs and (in Triton 3.9, for kernels that call other ``@triton.jit``
helpers) leaves part of ``triton.language.core`` patched, after which code generation crashes. So
compilation happens in a child Python process started with ``TRITON_INTERPRET`` removed: there the
kernel's module imports cleanly and its kernels are ordinary ``JITFunction``s. One child compiles a
whole batch of jobs, so the cost of importing torch and triton is paid once per batch. This works for
any kernel that is importable as ``module.attribute``, whatever the interpreter has done here.

Registers and spills come from ``cuobjdump --dump-resource-usage`` on the cubin (Triton ships the
tool): ``REG`` is registers per thread and ``STACK`` is the local-memory stack frame, which for a
Triton kernel (no local arrays) is register spill space. ``CompiledKernel.n_regs``/``n_spills`` are
only filled in when the kernel is loaded on a device, so they are not available here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Per-block dynamic shared memory limits (opt-in maximum), from the CUDA programming guide's table
# of compute capabilities: 163 KiB on sm_80, 227 KiB on sm_90.
SMEM_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}
A100, H100 = 80, 90
CAPABILITIES = (A100, H100)

_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class AotJob:
    """One kernel specialisation to compile.

    ``kernel`` is ``"module:attribute"`` (see :func:`kernel_path`). ``signature`` maps every argument
    name to a Triton type string (``"*fp16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``); ``constexprs``
    gives the constexpr values. ``divisible_by_16`` names pointer/int arguments that the runtime would
    specialise as 16-divisible (aligned tensors, sizes multiple of 16), so the cubin matches what a
    real launch compiles.
    """

    kernel: str
    signature: dict
    constexprs: dict
    capability: int
    num_warps: int = 4
    num_stages: int = 2
    divisible_by_16: tuple = ()

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel} sm_{self.capability} warps={self.num_warps} stages={self.num_stages} [{consts}]"


@dataclass
class AotResult:
    job: AotJob
    shared_bytes: int | None = None
    n_regs: int | None = None
    stack_bytes: int | None = None  # local-memory stack frame: register spills
    ptx_features: tuple = ()  # which of _PTX_FEATURES the kernel's PTX uses
    error: str | None = None

    @property
    def smem_limit(self) -> int:
        return SMEM_LIMIT_BYTES[self.job.capability]

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared_bytes is not None and self.shared_bytes <= self.smem_limit

    def describe(self) -> str:
        if self.error:
            return f"{self.job.describe()}: ERROR {self.error.strip().splitlines()[-1]}"
        return (
            f"{self.job.describe()}: smem {self.shared_bytes}/{self.smem_limit} B, "
            f"regs {self.n_regs}, spill stack {self.stack_bytes} B, ptx {'/'.join(self.ptx_features) or '-'}"
        )


def kernel_path(kernel) -> str:
    """``"module:name"`` for a ``@triton.jit`` kernel, interpreted or not (both keep ``.fn``)."""
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}:{fn.__name__}"


def compile_many(jobs: list[AotJob], timeout: float = 1800) -> list[AotResult]:
    """Compile every job in one child process; one result per job, in order.

    A job that fails to compile comes back with ``error`` set rather than raising, so a test can name
    every failing config at once.
    """
    if not jobs:
        return []
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    payload = json.dumps([asdict(j) for j in jobs])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.aot"],
        input=payload,
        capture_output=True,
        text=True,
        cwd=_REPO_ROOT,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [AotResult(job=j, **{**row, "ptx_features": tuple(row.get("ptx_features", ()))}) for j, row in zip(jobs, rows)]


def compile_kernel(kernel, signature: dict, constexprs: dict, *, capability: int, num_warps: int = 4,
                   num_stages: int = 2, divisible_by_16: tuple = ()) -> AotResult:
    """Compile one specialisation of ``kernel`` (a ``@triton.jit`` object or ``"module:name"``)."""
    path = kernel if isinstance(kernel, str) else kernel_path(kernel)
    job = AotJob(path, dict(signature), dict(constexprs), capability, num_warps, num_stages, tuple(divisible_by_16))
    return compile_many([job])[0]


# ----------------------------------------------------------------------------------------------
# Child process side.


def _resource_usage(cubin: bytes, kernel_name: str) -> tuple[int | None, int | None]:
    import tempfile

    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # a Triton without a bundled cuobjdump: registers and spills stay unknown
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    # "Function <name>:\n  REG:40 STACK:0 SHARED:0 LOCAL:0 ..."
    m = re.search(r"Function " + re.escape(kernel_name) + r":\s*\n\s*REG:(\d+)\s+STACK:(\d+)", out)
    if m is None:
        return None, None
    return int(m.group(1)), int(m.group(2))


# PTX instruction families worth asserting on: the tensor-core path (Hopper's warpgroup MMA, Ampere's
# mma.sync), asynchronous copies (cp.async) and Hopper's bulk tensor copies (TMA).
_PTX_FEATURES = {
    "wgmma": "wgmma.mma_async",
    "mma.sync": "mma.sync",
    "cp.async": "cp.async.",
    "tma": "cp.async.bulk.tensor",
}


def _compile_one(job: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    module_name, attr = job["kernel"].split(":")
    kernel = getattr(importlib.import_module(module_name), attr)
    arg_names = kernel.arg_names
    attrs = {(arg_names.index(n),): [["tt.divisibility", 16]] for n in job["divisible_by_16"]}
    src = triton.compiler.ASTSource(fn=kernel, signature=job["signature"], constexprs=job["constexprs"], attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", job["capability"], 32),
        options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
    )
    n_regs, stack = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    ptx = compiled.asm["ptx"]
    features = [name for name, needle in _PTX_FEATURES.items() if needle in ptx]
    return {"shared_bytes": int(compiled.metadata.shared), "n_regs": n_regs, "stack_bytes": stack,
            "ptx_features": features}


def _worker() -> None:
    import traceback

    jobs = json.loads(sys.stdin.read())
    rows = []
    for job in jobs:
        try:
            rows.append(_compile_one(job))
        except Exception:
            rows.append({"error": traceback.format_exc(limit=3)})
    # ptxas or Triton may print; the result is always the last stdout line.
    sys.stdout.write("\n" + json.dumps(rows) + "\n")


if __name__ == "__main__":
    _worker()


def check_compiled(result: "AotResult", record_property=None) -> None:
    """Assert that an AOT compile succeeded and fits the target's shared memory; record its resources
    (shared bytes, registers, spill stack) as test properties when pytest's ``record_property`` is given."""
    print(result.describe())
    assert result.error is None, result.error
    if record_property is not None:
        record_property("shared_bytes", result.shared_bytes)
        record_property("n_regs", result.n_regs)
        record_property("spill_stack_bytes", result.stack_bytes)
    assert result.fits, result.describe()
