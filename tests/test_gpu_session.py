"""bench/gpu_session.sh: the GPU run's plumbing, rehearsed on CPU so a script that would crash on the
GPU is caught here, before it costs device time."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_session.sh"


def _load_driver():
    spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "bench" / "gpu_session.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gpu_session = _load_driver()
CUDA_STEPS = {"tests-gpu", "tests-kernels", "bench-attention", "bench-layer-norm", "bench-linear"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-results")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "ALTCLIP_FAST_BACKEND", "TRITON_INTERPRET")}
    began = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, out, time.monotonic() - began


def test_dry_run_succeeds_within_its_budget(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert seconds < 180, f"the dry run took {seconds:.0f} s; it must stay under 3 minutes"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    names = [s["name"] for s in summary["steps"]]
    assert names == [s.name for s in gpu_session.steps(out)]  # every step, in priority order
    for step in summary["steps"]:
        want = "notice" if step["name"] in CUDA_STEPS else "ok"
        assert step["status"] == want, step
        if want == "ok":
            assert step["returncode"] == 0 and 0 < step["seconds"] <= step["cap_s"], step


def test_dry_run_writes_what_the_gpu_run_brings_back(dry_run):
    _, out, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # the device tool brings back at most 8 files
    env = json.loads((out / "env.json").read_text())
    assert env["cuda_available"] is False and env["torch"]
    e2e = json.loads((out / "e2e.json").read_text())
    assert [r["workload"] for r in e2e["results"]][:2] == ["images b=1", "images b=2"]
    assert all(r["altclip_fast"]["first_call_s"] > 0 for r in e2e["results"])
    assert e2e["accuracy"]["altclip_fast"]["image_embeds_max_abs"] < 1e-4  # tiny fp32 through the kernels
    facts = (out / "compile-facts.md").read_text()  # the dry run's slice: one config per bf16 launch, sm_90
    assert facts.startswith("# Compile facts: Triton") and facts.count("| bf16 |") >= 11
    compiled = json.loads((out / "e2e-compile.json").read_text())
    assert "transformers runs under torch.compile" in compiled["meta"]["notes"]
    assert compiled["results"] and "transformers" in compiled["results"][0]
    log = (out / "session.log").read_text()
    for name in CUDA_STEPS:
        assert f"=== {name}: notice, 0 s (needs CUDA" in log


def test_dry_run_drives_the_triton_backend(dry_run):
    """The e2e step of the dry run runs the model through the interpreted kernels, as the GPU run
    does through the compiled ones."""
    _, out, _ = dry_run
    summary = json.loads((out / "summary.json").read_text())
    e2e = next(s for s in summary["steps"] if s["name"] == "e2e")
    assert "--arch tiny" in e2e["command"]
    step = next(s for s in gpu_session.steps(out) if s.name == "e2e")
    assert step.dry_env == {"ALTCLIP_FAST_BACKEND": "triton", "TRITON_INTERPRET": "1"}


def _session(tmp_path, budget=60.0):
    return gpu_session.Session(tmp_path, budget, dry_run=True)


def test_a_failing_step_is_recorded_and_the_run_goes_on(tmp_path):
    session = _session(tmp_path)
    bad = gpu_session.Step("bad", "fails", 30, gpu=[], dry=[sys.executable, "-c", "import sys; sys.exit(3)"], min_s=1)
    good = gpu_session.Step("good", "works", 30, gpu=[], dry=[sys.executable, "-c", "print('hello')"], min_s=1)
    assert session.run(bad).status == "failed"
    assert session.run(good).status == "ok"
    assert not session.succeeded
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert [(s["name"], s["status"], s["returncode"]) for s in steps] == [("bad", "failed", 3), ("good", "ok", 0)]
    assert "hello" in (tmp_path / "session.log").read_text()


def test_a_step_past_its_cap_is_killed_with_its_children(tmp_path):
    session = _session(tmp_path)
    marker = tmp_path / "child-finished"
    # A child that would outlive its parent if only the parent were killed.
    code = f"import subprocess, sys; subprocess.Popen(['sh', '-c', 'sleep 8; touch {marker}']).wait()"
    step = gpu_session.Step("slow", "sleeps", 2, gpu=[], dry=[sys.executable, "-c", code], min_s=1)
    began = time.monotonic()
    outcome = session.run(step)
    assert outcome.status == "timeout" and outcome.returncode is None
    assert time.monotonic() - began < 7
    time.sleep(7)
    assert not marker.exists(), "the step's child process survived the cap"


def test_steps_are_capped_by_the_budget_left(tmp_path):
    session = _session(tmp_path, budget=3.0)
    step = gpu_session.Step("long", "needs more", 100, gpu=[], dry=[sys.executable, "-c", "pass"], min_s=10)
    outcome = session.run(step)
    assert outcome.status == "skipped" and "budget" in outcome.note
    short = gpu_session.Step("short", "fits", 100, gpu=[], dry=[sys.executable, "-c", "pass"], min_s=1)
    outcome = session.run(short)
    assert outcome.status == "ok" and outcome.cap_s <= 3


def test_the_gpu_run_fits_its_window():
    """The caps of the steps the GPU run reaches first (everything but the microbenchmarks and the compile
    facts, which a CPU can also produce) fit the default budget, and the budget leaves room to rerun
    within a 15-minute lease (a cold start takes 1-2 minutes)."""
    plan = gpu_session.steps(Path("out"))
    assert gpu_session.DEFAULT_BUDGET_S <= 8 * 60
    optional = [s.name.startswith("bench-") or s.name == "compile-facts" for s in plan]
    assert sum(s.cap_s for s, opt in zip(plan, optional) if not opt) <= gpu_session.DEFAULT_BUDGET_S
    assert optional == sorted(optional)  # the optional steps come last
    assert [s.name for s in plan][:2] == ["env", "tests-gpu"] and optional[-1]


def test_cli_errors(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--only", "nope", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown step(s) nope" in proc.stderr
    listing = subprocess.run(["bash", str(SCRIPT), "--list"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "e2e" in listing.stdout and "budget 480 s" in listing.stdout
    if not _cuda():
        proc = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and "no CUDA device here; use --dry-run" in proc.stdout


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
