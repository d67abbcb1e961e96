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

Registers and spills come from the log of the very ``ptxas -v`` run that made the cubin (Triton's
``TRITON_DUMP_PTXAS_LOG``, with a fresh cache so that every job really runs ptxas): registers per
thread, the stack frame and the spill stores and loads. Running ptxas again by hand would need
Triton's exact options, which differ between versions (3.9 adds ``--regAllocOptLevel=2``).
``CompiledKernel.n_regs``/``n_spills`` are only filled in when the kernel is loaded on a device, so
they are not available here. Triton's wheel ships ptxas; without it nothing compiles, and a job
says so in its error.

Jobs are split over ``AOT_WORKERS`` child processes (default: the CPU count, at most 4), and each
distinct job compiles once per test session, whichever test file asks for it first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
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
    stack_bytes: int | None = None  # local-memory stack frame (a Triton kernel has no local arrays)
    spill_stores: int | None = None  # bytes of register spill stores, from ptxas
    spill_loads: int | None = None
    ptx_features: tuple = ()  # which of _PTX_FEATURES the kernel's PTX uses
    error: str | None = None

    @property
    def spills(self) -> bool | None:
        if self.spill_stores is None:
            return None
        return bool(self.spill_stores or self.spill_loads or self.stack_bytes)

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
            f"regs {self.n_regs}, spill stores {self.spill_stores} B, stack {self.stack_bytes} B, "
            f"ptx {'/'.join(self.ptx_features) or '-'}"
        )


def kernel_path(kernel) -> str:
    """``"module:name"`` for a ``@triton.jit`` kernel, interpreted or not (both keep ``.fn``)."""
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}:{fn.__name__}"


_RESULTS: dict[str, dict] = {}  # job key -> result row, for the whole test session


def _key(job: AotJob) -> str:
    return json.dumps(asdict(job), sort_keys=True)


def compile_many(jobs: list[AotJob], timeout: float = 1800, workers: int | None = None) -> list[AotResult]:
    """Compile every job in child processes; one result per job, in order.

    A job that fails to compile comes back with ``error`` set rather than raising, so a test can name
    every failing config at once. A job compiled before in this session is not compiled again.
    """
    keys = [_key(j) for j in jobs]
    todo = list(dict.fromkeys(k for k in keys if k not in _RESULTS))
    if todo:
        workers = workers or int(os.environ.get("AOT_WORKERS", 0)) or min(4, os.cpu_count() or 1)
        chunks = [todo[i::workers] for i in range(workers) if todo[i::workers]]
        with ThreadPoolExecutor(len(chunks)) as pool:
            for chunk, rows in zip(chunks, pool.map(lambda c: _run_worker(c, timeout), chunks)):
                _RESULTS.update(zip(chunk, rows))
    names = {f.name for f in fields(AotResult)}
    results = []
    for job, key in zip(jobs, keys):
        row = {k: v for k, v in _RESULTS[key].items() if k in names}
        results.append(AotResult(job=job, **{**row, "ptx_features": tuple(row.get("ptx_features", ()))}))
    return results


def _run_worker(keys: list[str], timeout: float) -> list[dict]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v's report, printed by Triton after each cubin
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.aot"],
        input="[" + ",".join(keys) + "]",
        capture_output=True,
        text=True,
        cwd=_REPO_ROOT,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_kernel(kernel, signature: dict, constexprs: dict, *, capability: int, num_warps: int = 4,
                   num_stages: int = 2, divisible_by_16: tuple = ()) -> AotResult:
    """Compile one specialisation of ``kernel`` (a ``@triton.jit`` object or ``"module:name"``)."""
    path = kernel if isinstance(kernel, str) else kernel_path(kernel)
    job = AotJob(path, dict(signature), dict(constexprs), capability, num_warps, num_stages, tuple(divisible_by_16))
    return compile_many([job])[0]


# ----------------------------------------------------------------------------------------------
# Child process side.


def _ptxas_report(log: str, kernel_name: str) -> dict:
    """Registers, stack frame and spills of ``kernel_name`` from a ``ptxas -v`` log."""
    # "Function properties for NAME\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
    # "... info    : Used 78 registers, used 1 barriers, ..."
    props = re.search(r"Function properties for " + re.escape(kernel_name) + r"\s*\n\s*(\d+) bytes stack frame, "
                      r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Compiling entry function '" + re.escape(kernel_name) + r"'.*?Used (\d+) registers", log, re.S)
    if props is None or regs is None:
        raise RuntimeError(f"no ptxas -v report for {kernel_name} in the compile log:\n{log[-2000:]}")
    return {"n_regs": int(regs.group(1)), "stack_bytes": int(props.group(1)),
            "spill_stores": int(props.group(2)), "spill_loads": int(props.group(3))}


# PTX instruction families worth asserting on: the tensor-core path (Hopper's warpgroup MMA, Ampere's
# mma.sync), asynchronous copies (cp.async) and Hopper's bulk tensor copies (TMA).
_PTX_FEATURES = {
    "wgmma": "wgmma.mma_async",
    "mma.sync": "mma.sync",
    "cp.async": "cp.async.",
    "tma": "cp.async.bulk.tensor",
}


def _compile_one(job: dict) -> dict:
    import contextlib
    import importlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget

    module_name, attr = job["kernel"].split(":")
    kernel = getattr(importlib.import_module(module_name), attr)
    arg_names = kernel.arg_names
    attrs = {(arg_names.index(n),): [["tt.divisibility", 16]] for n in job["divisible_by_16"]}
    src = triton.compiler.ASTSource(fn=kernel, signature=job["signature"], constexprs=job["constexprs"], attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas's report there
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", job["capability"], 32),
            options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
        )
    ptx = compiled.asm["ptx"]
    features = [name for name, needle in _PTX_FEATURES.items() if needle in ptx]
    return {"shared_bytes": int(compiled.metadata.shared), "ptx_features": features,
            **_ptxas_report(log.getvalue(), compiled.metadata.name)}


def _worker() -> None:
    import tempfile
    import traceback

    jobs = json.loads(sys.stdin.read())
    rows = []
    # A fresh cache: a cached kernel skips ptxas, and with it the report the results come from.
    with tempfile.TemporaryDirectory(prefix="altclip-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
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
    (shared bytes, registers, spill stores) as test properties when pytest's ``record_property`` is given."""
    print(result.describe())
    assert result.error is None, result.error
    if record_property is not None:
        record_property("shared_bytes", result.shared_bytes)
        record_property("n_regs", result.n_regs)
        record_property("spill_stores", result.spill_stores)
    assert result.fits, result.describe()
