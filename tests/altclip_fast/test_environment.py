"""One registry of environment variables: every read goes through it, and the README lists it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from altclip_fast import environment

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "altclip_fast"
# Triton's own switch, set (not read) around the interpreted kernels: not a setting of ours.
RAW_ENVIRON_ALLOWED = {"environment.py", "ops/triton_backend.py"}


def _environ_uses(tree: ast.AST) -> list[int]:
    """Lines that touch ``os.environ`` or call ``os.getenv``."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
            and isinstance(node.value, ast.Name) and node.value.id == "os"]


def test_nothing_but_the_registry_reads_the_environment():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in RAW_ENVIRON_ALLOWED:
            continue
        offenders += [f"{rel}:{line}" for line in _environ_uses(ast.parse(path.read_text(), rel))]
    assert not offenders, f"read the environment through altclip_fast.environment.get: {offenders}"


def test_every_variable_named_in_the_package_is_registered():
    named = set()
    for path in PACKAGE.rglob("*.py"):
        named |= set(re.findall(r"\b_?ALTCLIP_FAST_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert named - set(environment.VARIABLES) == set()
    assert {n for n in environment.VARIABLES if "ALTCLIP_FAST" in n} == named, "a registered variable nobody reads"


def test_the_readme_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_0-9]+)` \| (`[^`]*`|\(unset\)) \|", section, flags=re.M)
    assert {name: default.strip("`") if default != "(unset)" else "" for name, default in rows} == {
        v.name: v.default for v in environment.VARIABLES.values()}


def test_get_reads_blank_as_the_default_and_refuses_unknown_names(monkeypatch):
    monkeypatch.setenv("ALTCLIP_FAST_BACKEND", "  ")
    assert environment.get("ALTCLIP_FAST_BACKEND") == "auto"
    monkeypatch.setenv("ALTCLIP_FAST_BACKEND", " torch ")
    assert environment.get("ALTCLIP_FAST_BACKEND") == "torch"
    with pytest.raises(KeyError):
        environment.get("ALTCLIP_FAST_NO_SUCH_SWITCH")
