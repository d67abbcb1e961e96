"""What the distribution installs: only import names this project owns, laid out as in the repository.

``kernels`` and ``reference`` are other projects' names on PyPI (Hugging Face's ``kernels``, which
transformers requires, installs a top-level ``kernels`` package), so ours live at
``altclip_fast/kernels`` and ``altclip_fast/reference``, in the checkout as in the wheel.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_installed_package_is_under_altclip_fast():
    packages = _setuptools_table()["packages"]
    assert packages and all(p == "altclip_fast" or p.startswith("altclip_fast.") for p in packages), packages


def test_the_repository_layout_is_the_installed_layout():
    """No package-dir mapping: each package installs from the folder its dotted name spells, so a
    checkout on sys.path imports exactly what the wheel installs, and nothing under another name."""
    table = _setuptools_table()
    assert "package-dir" not in table, table.get("package-dir")
    for package in table["packages"]:
        assert (ROOT / package.replace(".", "/") / "__init__.py").is_file(), package


def test_every_subpackage_is_listed():
    """A subpackage missing from the list would be left out of the wheel (and work only in a checkout)."""
    listed = set(_setuptools_table()["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "altclip_fast").rglob("__init__.py")}
    assert found == listed, (sorted(found - listed), sorted(listed - found))


def test_installed_top_level_names():
    try:
        dist = importlib.metadata.distribution("altclip-fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("altclip-fast is not installed (running from a checkout)")
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        assert top_level.split() == ["altclip_fast"]


def test_kernels_and_reference_import_under_altclip_fast_only(tmp_path):
    """As installed, outside the checkout: our kernels and reference answer only to altclip_fast.* names.
    (tests/test_checkout_imports.py checks the same from inside the checkout.)"""
    try:
        importlib.metadata.distribution("altclip-fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("altclip-fast is not installed (running from a checkout)")
    code = (
        "import importlib.util, sys\n"
        "import altclip_fast.kernels, altclip_fast.reference\n"
        "from altclip_fast import AltCLIPModel\n"
        "assert altclip_fast.kernels.__name__ == 'altclip_fast.kernels'\n"
        "for generic in ('kernels', 'reference'):\n"
        "    spec = importlib.util.find_spec(generic)\n"
        f"    assert spec is None or not str(spec.origin).startswith({str(ROOT)!r}), (generic, spec.origin)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torch_ops_use_the_project_namespace():
    import torch

    import altclip_fast.kernels as kernels

    for name in ("attention", "add_layer_norm", "linear"):
        getattr(kernels, name)  # defines and registers the op
        assert hasattr(torch.ops.altclip_fast, name), name
