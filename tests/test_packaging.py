"""What the distribution installs: only import names this project owns.

``kernels`` and ``reference`` are other projects' names on PyPI (Hugging Face's ``kernels`` installs a
top-level ``kernels`` package), so the repository's kernels/ and reference/ folders install inside
``altclip_fast``.
"""

from __future__ import annotations

import importlib.metadata
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


def test_package_dirs_point_at_the_repository_folders():
    package_dir = _setuptools_table()["package-dir"]
    assert package_dir == {"altclip_fast.kernels": "kernels", "altclip_fast.reference": "reference"}
    for folder in package_dir.values():
        assert (ROOT / folder / "__init__.py").is_file()


def test_every_subpackage_is_listed():
    """A subpackage missing from the list would be left out of the wheel (and work only in a checkout)."""
    listed = set(_setuptools_table()["packages"])
    found = {"altclip_fast." + ".".join(p.parent.relative_to(ROOT / "altclip_fast").parts)
             for p in (ROOT / "altclip_fast").glob("*/__init__.py")}
    assert found <= listed, sorted(found - listed)


def test_installed_top_level_names():
    try:
        dist = importlib.metadata.distribution("altclip-fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("altclip-fast is not installed (running from a checkout)")
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        assert top_level.split() == ["altclip_fast"]


def test_kernels_and_reference_import_under_altclip_fast_only():
    import altclip_fast.kernels
    import altclip_fast.reference

    assert altclip_fast.kernels.__name__ == "altclip_fast.kernels"
    assert altclip_fast.reference.__name__ == "altclip_fast.reference"
    # Nothing of ours registered the generic names.
    for generic in ("kernels", "reference"):
        module = sys.modules.get(generic)
        assert module is None or not str(getattr(module, "__file__", "")).startswith(str(ROOT)), generic


def test_torch_ops_use_the_project_namespace():
    import torch

    import altclip_fast.kernels as kernels

    for name in ("attention", "add_layer_norm", "linear"):
        getattr(kernels, name)  # defines and registers the op
        assert hasattr(torch.ops.altclip_fast, name), name
