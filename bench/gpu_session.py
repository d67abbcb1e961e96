"""Everything that needs a CUDA GPU, as one run sized for a short device lease, with a CPU rehearsal.

    PYTHONPATH=. bash bench/gpu_session.sh [--dry-run] [--budget SECONDS] [--only STEP,...] [--list]

Steps run in order of priority: the environment report, correctness (GPU tests, the Triton-backend
model tests, the kernel suites on CUDA tensors), the end-to-end benchmark in bf16 against
transformers (sdpa, then with torch.compile), then kernel microbenchmarks, and last what ptxas says about
every kernel config (``compile-facts.md``: no GPU needed, but from this machine's Triton). Each step runs in its own
process group with a time cap, trimmed to what is left of the budget (default 480 s: the run must fit
an 8-minute window with room for a rerun in a 15-minute lease); a step that cannot get its minimum
is skipped and says so. A failing or timed-out step never stops the run.

Results stream to ``$OUT`` (default ``./gpu-results``) as each step ends: ``session.log`` (every
step's output), ``summary.json`` (per step: status, exit code, seconds, cap), and the JSON each
benchmark writes. At most 8 files, as the device tool brings back.

``--dry-run`` rehearses the same plumbing on a machine without CUDA in well under 3 minutes: the
same argument parsing, logging, JSON and time caps, with a tiny model, the Triton paths under the
interpreter, and a one-line notice in place of each step that needs CUDA. It exits 0 only if every
step it could run succeeded (tests/test_gpu_session.py runs it in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 480
PY = sys.executable

ENV_REPORT = r"""
import json, os, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
try:
    import transformers
    info["transformers"] = transformers.__version__
except ImportError:
    info["transformers"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                capability=f"{p.major}.{p.minor}")
print(json.dumps(info))
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2)
"""


# Correctness needs a working config, not the fastest: one config per autotune key keeps a cold
# machine from compiling and timing every candidate for every test shape (altclip_fast/kernels/_runtime.py).
ONE_CONFIG = {"ALTCLIP_FAST_AUTOTUNE_LIMIT": "1"}


@dataclass
class Step:
    """One command with a time cap. ``dry`` is the command for ``--dry-run`` (None: it needs CUDA, and
    a notice stands in for it). ``min_s``: below this much budget the step is not worth starting."""

    name: str
    what: str
    cap_s: int
    gpu: list[str]
    dry: list[str] | None = None
    min_s: int = 20
    env: dict = field(default_factory=dict)
    dry_env: dict = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    what: str
    status: str  # ok, failed, timeout, skipped (no budget), notice (needs CUDA)
    returncode: int | None
    seconds: float
    cap_s: int
    command: str | None
    note: str = ""


def steps(out: Path) -> list[Step]:
    """The run, most important first."""
    pytest = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--maxfail=20"]
    tiny_bench = ["--arch", "tiny", "--device", "cpu", "--dtype", "fp32", "--batches", "1,2", "--texts", "4",
                  "--rounds", "1"]
    e2e = [PY, "-m", "altclip_fast.apps.benchmark"]
    return [
        Step("env", "environment report", 30, [PY, "-c", ENV_REPORT, str(out / "env.json")],
             dry=[PY, "-c", ENV_REPORT, str(out / "env.json")], min_s=5),
        Step("tests-gpu", "GPU-only tests (bf16 kernels, torch.compile, CUDA graphs)", 80,
             pytest + ["-m", "gpu", "tests"], env=ONE_CONFIG),
        Step("tests-model-triton", "the whole model through the Triton backend", 50,
             pytest + ["tests/altclip_fast/modeling/test_model_triton.py", "tests/altclip_fast/ops/test_dispatch.py",
                       "tests/altclip_fast/ops/test_gemm_choice.py"],
             # Under the interpreter the whole file is slow: the fp32 parity test shows the path works.
             dry=pytest + ["tests/altclip_fast/modeling/test_model_triton.py", "-k", "test_fp32_through_the_kernels", "-x"],
             env=ONE_CONFIG),
        Step("tests-kernels", "kernel suites on CUDA tensors (fp32, fp16)", 80,
             pytest + ["tests/kernels", "-m", "not gpu", "--ignore-glob=*_aot.py"], env=ONE_CONFIG),
        Step("e2e", "bf16 end to end: images b=1,32,256, 64 mixed texts, vs transformers sdpa", 170,
             e2e + ["--dtype", "bf16", "--batches", "1,32,256", "--texts", "64", "--rounds", "3",
                    "--json", str(out / "e2e.json")],
             dry=e2e + tiny_bench + ["--json", str(out / "e2e.json")], min_s=60,
             # transformers imports Triton before the kernels, so the interpreter is on from the start.
             dry_env={"ALTCLIP_FAST_BACKEND": "triton", "TRITON_INTERPRET": "1"}),
        Step("e2e-compile", "bf16 images b=32 vs transformers sdpa under torch.compile", 60,
             e2e + ["--dtype", "bf16", "--batches", "32", "--texts", "0", "--rounds", "3", "--no-check",
                    "--no-cuda-graphs", "--transformers-compile", "--json", str(out / "e2e-compile.json")],
             dry=e2e + tiny_bench + ["--texts", "0", "--no-check", "--transformers-compile",
                                     "--json", str(out / "e2e-compile.json")], min_s=40),
        Step("bench-attention", "attention kernel vs SDPA backends, 257 tokens, head_dim 64", 40,
             [PY, "bench/bench_attention.py", "--dtype", "bf16", "--json", str(out / "attention.json")]),
        Step("bench-layer-norm", "add_layer_norm vs torch, against copy bandwidth", 30,
             [PY, "bench/bench_layer_norm.py", "--dtype", "bf16"]),
        Step("bench-linear", "GEMM + epilogue vs cuBLAS + torch epilogue", 40,
             [PY, "bench/bench_linear.py", "--dtype", "bf16"]),
        # Needs no GPU, but runs here so that the facts of this machine's Triton come back with its figures.
        Step("compile-facts", "ptxas on every kernel config at AltCLIP's shapes, sm_80 and sm_90", 60,
             pytest + ["tests/kernels/test_compile_facts.py"], dry=pytest + ["tests/kernels/test_compile_facts.py"],
             min_s=20,
             env={"ALTCLIP_FAST_COMPILE_FACTS_TABLE": str(out / "compile-facts.md"), "AOT_WORKERS": "12"},
             # The dry run compiles one config of each bf16 launch for sm_90: the plumbing, in seconds.
             dry_env={"ALTCLIP_FAST_COMPILE_FACTS": "quick", "AOT_WORKERS": "2"}),
    ]


class Session:
    def __init__(self, out: Path, budget_s: float, dry_run: bool):
        self.out, self.budget_s, self.dry_run = out, budget_s, dry_run
        self.start = time.monotonic()
        self.outcomes: list[Outcome] = []
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "session.log"
        self.log_path.write_text("")

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def log(self, text: str) -> None:
        print(text, flush=True)
        with self.log_path.open("a") as f:
            f.write(text + "\n")

    def run(self, step: Step) -> Outcome:
        command = step.dry if self.dry_run else step.gpu
        if command is None:
            return self._record(Outcome(step.name, step.what, "notice", None, 0.0, step.cap_s, None,
                                        "needs CUDA: not run in the dry run"))
        cap = int(min(step.cap_s, self.left()))
        if cap < step.min_s:
            return self._record(Outcome(step.name, step.what, "skipped", None, 0.0, step.cap_s, _shell(command),
                                        f"{max(self.left(), 0):.0f} s of budget left, the step needs {step.min_s} s"))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env, **(step.dry_env if self.dry_run else {})}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.log(f"=== {time.strftime('%H:%M:%S')} {step.name} (cap {cap} s): {_shell(command)}")
        began = time.monotonic()
        code, timed_out = _run_capped(command, cap, env, self.log_path)
        seconds = time.monotonic() - began
        status = "timeout" if timed_out else ("ok" if code == 0 else "failed")
        return self._record(Outcome(step.name, step.what, status, code, round(seconds, 1), cap, _shell(command)))

    def _record(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        detail = f" ({outcome.note})" if outcome.note else ""
        self.log(f"=== {outcome.name}: {outcome.status}, {outcome.seconds:.0f} s{detail}")
        self.write_summary()
        return outcome

    def write_summary(self) -> None:
        summary = {
            "dry_run": self.dry_run,
            "budget_s": self.budget_s,
            "elapsed_s": round(time.monotonic() - self.start, 1),
            "steps": [asdict(o) for o in self.outcomes],
        }
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.out / "summary.json")

    @property
    def succeeded(self) -> bool:
        return all(o.status in ("ok", "notice") for o in self.outcomes)


def _shell(command: list[str]) -> str:
    return " ".join(command).replace(ENV_REPORT, "<env report>")


def _run_capped(command: list[str], cap: float, env: dict, log_path: Path) -> tuple[int | None, bool]:
    """Run ``command`` in its own process group, its output appended to the log as it comes; past
    ``cap`` seconds the whole group is killed (pytest workers and compile subprocesses too)."""
    with log_path.open("a") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)

        def copy_output():
            for line in iter(proc.stdout.readline, b""):
                text = line.decode("utf-8", errors="replace")
                sys.stdout.write(text)
                sys.stdout.flush()
                log.write(text)
                log.flush()

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=cap)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        reader.join(timeout=5)  # a grandchild holding the pipe open must not hang the run
    return (None if timed_out else proc.returncode), timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu_session.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="rehearse on CPU: tiny model, interpreter, notices")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--only", default=None, help="comma-separated step names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the steps and their caps, then exit")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-results",
                        help="results folder (default $OUT, else ./gpu-results)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error("--budget must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    plan = steps(out)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {s.name for s in plan})
        if unknown:
            print(f"gpu_session: unknown step(s) {', '.join(unknown)}; see --list", file=sys.stderr)
            return 2
        plan = [s for s in plan if s.name in wanted]
    if args.list:
        for s in plan:
            print(f"{s.name:<20} cap {s.cap_s:>4} s  {s.what}")
        print(f"{'total':<20} cap {sum(s.cap_s for s in plan):>4} s  (budget {args.budget:.0f} s)")
        return 0
    session = Session(out, args.budget, args.dry_run)
    if not args.dry_run:
        import torch  # only to refuse early: every GPU step would fail without CUDA

        if not torch.cuda.is_available():
            session.log("gpu_session: no CUDA device here; use --dry-run to rehearse on CPU")
            return 2
    session.log(f"gpu_session: {'dry run' if args.dry_run else 'GPU run'}, budget {args.budget:.0f} s, "
                f"results in {out}")
    for step in plan:
        session.run(step)
    session.log("gpu_session: " + ", ".join(f"{o.name} {o.status}" for o in session.outcomes)
                + f"; {time.monotonic() - session.start:.0f} s")
    return 0 if session.succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
