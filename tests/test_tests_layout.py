"""The tests folder mirrors the package, and tests share code through conftest.py files and helper
modules only: a test module that imports another runs that module's fixtures and tests twice, under
two names, and breaks when it moves."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_test_module_imports_another():
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        for name in _imported(path):
            if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_"):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_test_folders_mirror_the_package():
    """Every folder under tests/altclip_fast is a folder of altclip_fast (kernels and reference have
    their own top-level test folders, as before the move)."""
    package = ROOT / "altclip_fast"
    folders = [p.relative_to(TESTS / "altclip_fast") for p in (TESTS / "altclip_fast").rglob("*")
               if p.is_dir() and p.name != "__pycache__"]
    assert folders, "no test folders"
    assert [f for f in folders if not (package / f).is_dir()] == []
    assert not [p.name for p in (TESTS / "altclip_fast").glob("test_*.py")
                if not (package / p.name.removeprefix("test_")).is_file()], "a flat test file with no module"
