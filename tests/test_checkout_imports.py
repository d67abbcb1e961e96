"""Starting Python in the checkout root must not shadow other projects' packages.

Each way people start Python there puts the root on ``sys.path``: ``python -m pytest``, ``python -c``
and ``PYTHONPATH=. python`` (which the GPU run uses). A folder in the root named like an installed
package then wins over it. That happened with our old top-level ``kernels/``: transformers requires
Hugging Face's ``kernels`` package, imported ours instead and failed, so every test needing transformers
errored on a fresh machine. Each probe below runs in a subprocess whose working directory is the root.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Importable names the root may hold: the product, and the test suite (pytest's usual layout, imported
# as tests.*; no distribution should install a top-level package called tests).
OWNED = {"altclip_fast", "tests"}

PROBE = """
import importlib.metadata, importlib.util, os, sys
from pathlib import Path

root = Path(os.environ["ALTCLIP_FAST_CHECKOUT"]).resolve()
on_path = [p for p in sys.path if Path(p or ".").resolve() == root]
assert on_path, f"the checkout root is not on sys.path, so this probe proves nothing: {sys.path}"


def from_checkout(name):
    spec = importlib.util.find_spec(name)
    origins = [spec.origin] if spec and spec.origin else list(spec.submodule_search_locations or []) if spec else []
    return any(root == Path(o).resolve() or root in Path(o).resolve().parents for o in origins)


import transformers.models.altclip.modeling_altclip  # noqa: E402, F401  (transformers imports `kernels`)

try:
    hub_kernels = importlib.metadata.distribution("kernels")
except importlib.metadata.PackageNotFoundError:
    hub_kernels = None
if hub_kernels is not None:
    import kernels
    installed = Path(hub_kernels.locate_file("kernels/__init__.py")).resolve()
    assert Path(kernels.__file__).resolve() == installed, f"import kernels gave {kernels.__file__}, not {installed}"
for name in ("kernels", "reference"):
    assert not from_checkout(name), f"import {name} finds the checkout's {name}"
print("probe ok", "kernels " + hub_kernels.version if hub_kernels else "no kernels distribution")
"""


def _environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "ALTCLIP_FAST_CHECKOUT": str(ROOT), **extra}


def _run(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _assert_probe_passed(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0 and "probe ok" in proc.stdout, (proc.stdout[-3000:] + proc.stderr[-3000:])


@pytest.fixture(autouse=True, scope="module")
def _needs_transformers():
    pytest.importorskip("transformers")


def test_python_dash_c_in_the_checkout():
    _assert_probe_passed(_run([sys.executable, "-c", PROBE], _environment()))


def test_pythonpath_dot_in_the_checkout(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    _assert_probe_passed(_run([sys.executable, str(script)], _environment(PYTHONPATH=".")))


def test_python_dash_m_pytest_in_the_checkout(tmp_path):
    test_file = tmp_path / "test_probe.py"
    test_file.write_text("def test_probe():\n    exec(compile(PROBE, 'probe', 'exec'), {})\n\n\nPROBE = " + repr(PROBE) + "\n")
    proc = _run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(test_file)], _environment())
    _assert_probe_passed(proc)
    assert "1 passed" in proc.stdout, proc.stdout[-3000:]


def _importable_names(folder: Path) -> set[str]:
    """Names ``import x`` could find in folder: packages, namespace folders, modules."""
    names = set()
    for entry in folder.iterdir():
        stem = entry.name if entry.is_dir() else entry.name.split(".")[0]
        if entry.is_file() and not entry.name.endswith((".py", ".pyc", ".so", ".pyd")):
            continue
        if stem.isidentifier():
            names.add(stem)
    return names


def test_the_root_holds_only_names_this_project_owns():
    regular = {n for n in _importable_names(ROOT) if (ROOT / n / "__init__.py").is_file() or (ROOT / f"{n}.py").is_file()}
    assert regular <= OWNED, f"importable from the checkout root under names we do not own: {sorted(regular - OWNED)}"
    # Folders without __init__.py (bench/) import as namespace packages, which an installed package of
    # the same name still beats; but none of the root's names should be an installed project's.
    claimed = importlib.metadata.packages_distributions()
    clashes = {n: claimed[n] for n in _importable_names(ROOT) if n in claimed and set(claimed[n]) != {"altclip-fast"}}
    assert not clashes, f"the checkout root shadows installed packages: {clashes}"
