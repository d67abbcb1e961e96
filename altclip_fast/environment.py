"""Every environment variable altclip-fast reads, in one table, and the one function that reads them.

A variable that is not in ``VARIABLES`` cannot be read through ``get`` (a KeyError), so a new switch
has to be declared here, with what it means and who reads it, before any code can use it; a test keeps
the README's table and this one the same, and another checks that nothing else in the package reads
``os.environ`` for a name of ours.

The names that start with an underscore are fault-injection hooks for the tests (read through
``altclip_fast.apps.faults`` only): they are documented, never set in normal use, and no command-line
flag stands for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Variable", "VARIABLES", "get"]


@dataclass(frozen=True)
class Variable:
    name: str
    default: str  # what an unset (or empty) variable reads as
    read_by: str  # the module that reads it
    meaning: str


VARIABLES = {v.name: v for v in (
    Variable("ALTCLIP_FAST_BACKEND", "auto", "altclip_fast.ops",
             "Ops backend of the fast model and of optimize(): auto (Triton on CUDA, else torch), torch or triton."),
    Variable("ALTCLIP_FAST_GEMM", "auto", "altclip_fast.ops.gemm_choice",
             "Triton backend GEMMs: auto (timed per shape on the first call), triton or torch."),
    Variable("ALTCLIP_FAST_CPU_HALF_GEMM", "auto", "altclip_fast.ops.cpu_half",
             "bf16/fp16 GEMMs on CPU: auto (upcast where the CPU has no native bf16), native or fp32."),
    Variable("ALTCLIP_FAST_CPU_FP32_GEMM", "auto", "altclip_fast.ops.cpu_fp32_gemm",
             "fp32 GEMMs on CPU: auto (oneDNN or torch's BLAS, whichever a timed GEMM finds faster), onednn or blas."),
    Variable("ALTCLIP_FAST_AUTOTUNE_LIMIT", "", "altclip_fast.kernels._runtime",
             "Autotune only the first N configs of each kernel (empty: all of them)."),
    Variable("ALTCLIP_FAST_API_KEY", "", "altclip_fast.apps.serve.options",
             "serve: the API key, when --api-key is not given."),
    Variable("HF_HUB_OFFLINE", "", "altclip_fast.model_files",
             "Hugging Face's switch: hub ids resolve from the local cache only."),
    # Fault injection for the tests (altclip_fast.apps.faults); never set in normal use.
    Variable("_ALTCLIP_FAST_CRASH_AFTER_BATCHES", "", "altclip_fast.apps.faults",
             "SIGKILL the embedding process right after it saved that many batches."),
    Variable("_ALTCLIP_FAST_CRASH_AFTER_SHARDS", "", "altclip_fast.apps.faults",
             "SIGKILL the embedding process (the Ray driver too) right after that many shards are written."),
    Variable("_ALTCLIP_FAST_CRASH_BEFORE_META", "", "altclip_fast.apps.faults",
             "SIGKILL a single-file embed after its output is renamed into place, before its metadata is."),
    Variable("_ALTCLIP_FAST_CRASH_BEFORE_SHARD_EMB", "", "altclip_fast.apps.faults",
             "SIGKILL the process writing shard K (the value) after its metadata is renamed into place, before its embeddings are."),
    Variable("_ALTCLIP_FAST_RAY_KILL_ACTOR_ONCE", "", "altclip_fast.apps.faults",
             "A path: the first Ray model actor call that finds no file there creates it and kills its actor."),
    Variable("_ALTCLIP_FAST_SLOW_FORWARD_MS", "", "altclip_fast.apps.faults",
             "serve: hold every batch this many milliseconds before its forward pass (drills, tests)."),
)}


def get(name: str) -> str:
    """``$name`` stripped, or the variable's default when it is unset or blank."""
    variable = VARIABLES[name]
    value = os.environ.get(name, "").strip()
    return value or variable.default
