"""The kernel launches AltCLIP makes on a GPU, as compile jobs for every config the launcher may pick.

A ``Launch`` is one specialisation a real launch compiles: the kernel, its non-tile constexpr flags, the
Triton type of each pointer, and the arguments that arrive 16-divisible (pointers 16-byte aligned),
which Triton specialises on. ``altclip_launches()`` lists them for BAAI/AltCLIP's shapes in every dtype
the model runs on a GPU; ``tests/altclip_fast/modeling/test_compile_facts_coverage.py`` records the launches of
the full-size model and checks that each one is listed here and is at least as aligned as declared, so
this list cannot drift from the model. ``tests/kernels/test_compile_facts.py`` compiles every job.

Arguments whose divisibility depends on the input (token counts, ``M``, a mask's row stride) are
declared unaligned: the general case, which a real launch may beat but never falls below.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass

import torch

from tests.kernels.aot import CAPABILITIES, AotJob, AotResult, kernel_path

TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
               torch.uint8: "u8", torch.bool: "u8"}

# bf16 is what the model picks on sm_80 and sm_90; fp16 is the other half dtype a user may ask for;
# fp32 is the exact-parity mode, with IEEE products by default and TF32 when torch's matmul flag is on.
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_LINEAR_INTS = ("M", "N", "K", "stride_xm", "stride_wn", "stride_rm", "stride_ym", "M_BUCKET")
_ATTENTION_STRIDES = tuple(f"stride_{t}{d}" for t in "qkvo" for d in "bsh")
_LN_INTS = ("M", "N", "stride_x", "stride_r", "stride_y", "stride_s")


# module of altclip_fast.kernels -> its kernel
KERNELS = {"linear": "_linear_fwd", "attention": "_attention_fwd", "layer_norm": "_add_layer_norm_fwd"}


def _module(name: str):
    # The module, not the op of the same name that altclip_fast.kernels exposes.
    return importlib.import_module(f"altclip_fast.kernels.{name}")


def _arg_names(kernel) -> list[str]:
    return list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)


@dataclass(frozen=True)
class Launch:
    kernel: str  # "linear", "attention" or "layer_norm" (the module)
    dtype: torch.dtype  # of the activations
    flags: tuple  # ((name, value), ...): the constexprs that are not tile sizes
    pointers: tuple  # ((name, triton type), ...)
    ints: tuple  # names of the integer arguments
    floats: tuple = ()
    aligned: tuple = ()  # arguments a launch at AltCLIP's shapes passes 16-divisible
    hidden: int = 0  # layer_norm: the row length its launch config is chosen for

    def describe(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.flags if k not in ("HEAD_DIM", "BLOCK_D"))
        return f"{self.kernel} {TRITON_TYPE[self.dtype]} {flags}"

    def configs(self, capability: int) -> list[tuple[str, dict, int, int]]:
        """(name, tile constexprs, num_warps, num_stages) of every config the launcher may pick on a GPU of
        this compute capability."""
        flags = dict(self.flags)
        if self.kernel == "linear":
            configs = _module("linear").autotune_configs(self.dtype, flags["INPUT_PRECISION"],
                                                         capability=capability)
            return [(f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']} "
                     f"w{c.num_warps} s{c.num_stages}", dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]
        if self.kernel == "attention":
            configs = _module("attention").autotune_configs(flags["HEAD_DIM"], self.dtype, flags["DOT_PRECISION"],
                                                            capability=capability)
            return [(f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}",
                     dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]
        cfg = _module("layer_norm").launch_config(self.hidden)
        return [(f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']}",
                 {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}, cfg["num_warps"], 1)]

    def job(self, tiles: dict, num_warps: int, num_stages: int, capability: int) -> AotJob:
        kernel = getattr(_module(self.kernel), KERNELS[self.kernel])
        signature = {name: f"*{t}" for name, t in self.pointers}
        signature.update({name: "i32" for name in self.ints})
        signature.update({name: "fp32" for name in self.floats})
        constexprs = {**dict(self.flags), **tiles}
        signature.update({name: "constexpr" for name in constexprs})
        ordered = {name: signature[name] for name in _arg_names(kernel)}
        return AotJob(kernel_path(kernel), ordered, constexprs, capability, num_warps=num_warps,
                      num_stages=num_stages, divisible_by_16=tuple(a for a in self.aligned if a in ordered))


def altclip_shapes() -> tuple[int, int]:
    """(hidden size, head dim) of BAAI/AltCLIP, the same in both towers."""
    from altclip_fast.modeling.config import AltCLIPConfig

    cfg = AltCLIPConfig()
    towers = (cfg.text_config, cfg.vision_config)
    assert len({(t.hidden_size, t.num_attention_heads) for t in towers}) == 1, "the towers' shapes differ"
    return cfg.text_config.hidden_size, cfg.text_config.hidden_size // cfg.text_config.num_attention_heads


# Epilogues the model's GEMMs use: patch embedding and projections (none), QKV, out projection and
# transformation (bias), the MLP's fc1 (bias + exact GELU in text, quick_gelu in vision), the vision
# MLP's fc2 (bias + residual). Post-LN sublayers run their GEMM bare and put the bias in the LayerNorm.
LINEAR_EPILOGUES = ((False, None, False), (True, None, False), (True, "gelu", False),
                    (True, "quick_gelu", False), (True, None, True))
# (HAS_MASK, VARLEN): vision (padded, no mask), text (packed), the text tower's pooled-only last layer
# (its sequences scattered to a padded grid, with a mask).
ATTENTION_VARIANTS = ((False, False), (False, True), (True, False))
# (HAS_X_BIAS, HAS_RESIDUAL, HAS_BIAS, STORE_SUM): a plain LayerNorm, post-LN (GEMM bias folded in),
# pre-LN (the residual stream kept).
LAYER_NORM_VARIANTS = ((False, False, True, False), (True, True, True, False), (True, True, True, True))


def _precisions(dtype: torch.dtype) -> tuple[str, ...]:
    return ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)


def altclip_launches(dtypes=DTYPES) -> list[Launch]:
    hidden, head_dim = altclip_shapes()
    linear, attention, layer_norm = _module("linear"), _module("attention"), _module("layer_norm")
    launches = []
    for dtype in dtypes:
        t = TRITON_TYPE[dtype]
        for precision in _precisions(dtype):
            for has_bias, activation, has_residual in LINEAR_EPILOGUES:
                flags = (("HAS_BIAS", has_bias), ("ACTIVATION", linear.ACTIVATIONS[activation]),
                         ("HAS_RESIDUAL", has_residual), ("INPUT_PRECISION", precision), ("EVEN_K", True))
                pointers = tuple((p, t) for p in ("X", "W", "BIAS", "RESIDUAL", "Y"))
                # Every K and N is a multiple of 64 (the patch embedding's 588 is padded: see the Triton
                # backend) and rows are contiguous; M = tokens is whatever the batch makes it.
                aligned = ("X", "W", "BIAS", "RESIDUAL", "Y", "N", "K", "stride_xm", "stride_wn", "stride_rm",
                           "stride_ym")
                launches.append(Launch("linear", dtype, flags, pointers, _LINEAR_INTS, aligned=aligned))
            for has_mask, varlen in ATTENTION_VARIANTS:
                flags = (("HEAD_DIM", head_dim), ("BLOCK_D", attention._block_d(head_dim)), ("HAS_MASK", has_mask),
                         ("VARLEN", varlen), ("DOT_PRECISION", "tf32" if dtype != torch.float32 else precision))
                pointers = (("Q", t), ("K", t), ("V", t), ("Out", t), ("KeyMask", "u8"), ("CuSeqlens", "i32"))
                ints = (*_ATTENTION_STRIDES, "stride_mb", "stride_ms", "n_heads", "seqlen_q", "seqlen_k",
                        "SEQ_BUCKET")
                # Views of the fused QKV projection: every stride is a multiple of the head dim; the mask's
                # row stride is the padded length, which the batch decides.
                aligned = ("Q", "K", "V", "Out", "KeyMask", "CuSeqlens", *_ATTENTION_STRIDES, "n_heads", "SEQ_BUCKET")
                launches.append(Launch("attention", dtype, flags, pointers, ints, floats=("qk_scale",),
                                       aligned=aligned))
        for x_bias, residual, bias, store_sum in LAYER_NORM_VARIANTS:
            flags = (("HAS_X_BIAS", x_bias), ("HAS_RESIDUAL", residual), ("HAS_BIAS", bias),
                     ("STORE_SUM", store_sum))
            pointers = tuple((p, t) for p in ("X", "X_BIAS", "RESIDUAL", "W", "B", "Y", "SUM"))
            aligned = ("X", "X_BIAS", "RESIDUAL", "W", "B", "Y", "SUM", "N", "stride_x", "stride_r", "stride_y",
                       "stride_s")
            launches.append(Launch("layer_norm", dtype, flags, pointers, _LN_INTS, floats=("eps",), aligned=aligned,
                                   hidden=hidden))
    assert layer_norm.MAX_HIDDEN >= hidden
    return launches


@dataclass(frozen=True)
class Case:
    launch: Launch
    config: str
    capability: int
    job: AotJob

    @property
    def id(self) -> str:
        return f"{self.launch.describe()} [{self.config}] sm_{self.capability}"


def cases(launches: list[Launch] | None = None) -> list[Case]:
    """Every (launch, config, capability) to compile. ``ALTCLIP_FAST_COMPILE_FACTS=quick`` keeps the
    first config of each bf16 launch on sm_90 only: the GPU session's dry run checks the plumbing with it."""
    quick = os.environ.get("ALTCLIP_FAST_COMPILE_FACTS", "") == "quick"
    launches = launches if launches is not None else altclip_launches((torch.bfloat16,) if quick else DTYPES)
    out = []
    for launch in launches:
        for cap in (90,) if quick else CAPABILITIES:
            for name, tiles, warps, stages in launch.configs(cap)[: 1 if quick else None]:
                out.append(Case(launch, name, cap, launch.job(tiles, warps, stages, cap)))
    return out


def table(results: list[tuple[Case, AotResult]], header: str) -> str:
    """A markdown table of what the compiler says, one row per case."""
    lines = [header, "",
             "| kernel | dtype | flags | config | sm | regs | spill st/ld B | smem B | MMA | cp.async |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case, r in results:
        launch = case.launch
        flags = " ".join(f"{k}={v}" for k, v in launch.flags if k not in ("HEAD_DIM", "BLOCK_D"))
        if r.error:
            lines.append(f"| {launch.kernel} | {TRITON_TYPE[launch.dtype]} | {flags} | {case.config} | "
                         f"{case.capability} | ERROR: {r.error.strip().splitlines()[-1]} | | | | |")
            continue
        mma = next((f for f in r.ptx_features if f in ("wgmma", "mma.sync")), "-")
        lines.append(f"| {launch.kernel} | {TRITON_TYPE[launch.dtype]} | {flags} | {case.config} | {case.capability} | "
                     f"{r.n_regs} | {r.spill_stores}/{r.spill_loads} | {r.shared_bytes} | {mma} | "
                     f"{'yes' if 'cp.async' in r.ptx_features else 'no'} |")
    return "\n".join(lines) + "\n"


# --- checking a real launch against the list ------------------------------------------------------------

_TILE_KEYS = {"linear": {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPILOGUE_SPLIT"},
              "attention": {"BLOCK_M", "BLOCK_N"}, "layer_norm": {"BLOCK_M", "BLOCK_N"}}
_LAUNCH_OPTIONS = {"num_warps", "num_stages"}


def _unused_pointers(kernel: str, flags: dict) -> set[str]:
    """Pointers a launch passes as placeholders (another tensor) because its flags never read them."""
    if kernel == "attention":
        return ({"KeyMask"} if not flags["HAS_MASK"] else set()) | ({"CuSeqlens"} if not flags["VARLEN"] else set())
    return set()


def check_launch(kernel: str, args: dict, launches: list[Launch]) -> list[str]:
    """What is wrong with a real launch (``args``: every argument by name, constexprs and launch options
    included) as a case of ``launches``: not listed, other pointer types, or less aligned than declared.
    Empty when the list covers it."""
    tiles = {k: v for k, v in args.items() if k in _TILE_KEYS[kernel] | _LAUNCH_OPTIONS}
    constexpr_names = {name for launch in launches if launch.kernel == kernel for name, _ in launch.flags}
    flags = {k: v for k, v in args.items() if k in constexpr_names}
    candidates = [launch for launch in launches if launch.kernel == kernel and dict(launch.flags) == flags]
    if not candidates:
        return [f"{kernel} launch with flags {flags} is not in the compile facts' list"]
    problems = []
    unused = _unused_pointers(kernel, flags)
    data_dtype = next(t.dtype for name, t in args.items() if isinstance(t, torch.Tensor) and name not in unused)
    launch = next((c for c in candidates if c.dtype == data_dtype), None)
    if launch is None:
        return [f"{kernel} {flags} launched on {data_dtype}, which the list does not hold"]
    for name, triton_type in launch.pointers:
        value = args.get(name)
        if value is None or name in unused:
            continue  # a pointer the flags leave unread
        if TRITON_TYPE.get(value.dtype) != triton_type:
            problems.append(f"{launch.describe()}: {name} is {value.dtype}, the list compiles *{triton_type}")
    for name in launch.aligned:
        value = args.get(name)
        if value is None or name in unused:
            continue
        remainder = value.data_ptr() % 16 if isinstance(value, torch.Tensor) else int(value) % 16
        if remainder:
            shown = "a pointer" if isinstance(value, torch.Tensor) else value
            problems.append(f"{launch.describe()}: {name} = {shown} is not 16-divisible, but the list compiles "
                            "it as such")
    if kernel == "layer_norm":
        (_, compiled, warps, _), = launch.configs(capability=90)  # the heuristic's one config, any GPU
        want = {**compiled, "num_warps": warps}
        if tiles != want:
            problems.append(f"{launch.describe()}: launched with {tiles}, the list compiles {want}")
    return problems
