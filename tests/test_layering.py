"""Dependencies point one way: apps -> optimize/modeling -> preprocessing/ops -> kernels.

Read from the source (every import statement, including those inside functions), so a lazy import
that breaks the layering is caught as surely as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import altclip_fast

ROOT = Path(__file__).resolve().parent.parent

PACKAGE = ROOT / "altclip_fast"

# What each layer may import from this project (besides itself). Shared leaves (errors, dtypes, devices,
# model_files, environment) sit below everything in altclip_fast.
LEAVES = {"altclip_fast", "altclip_fast.errors", "altclip_fast.dtypes", "altclip_fast.devices",
          "altclip_fast.model_files", "altclip_fast.environment"}
ALLOWED = {
    "altclip_fast.kernels": {"altclip_fast.environment"},
    "altclip_fast.ops": {"altclip_fast.kernels", "altclip_fast.environment"},
    "altclip_fast.preprocessing": LEAVES,
    "altclip_fast.modeling": LEAVES | {"altclip_fast.ops", "altclip_fast.kernels"},
    "altclip_fast.optimize": LEAVES | {"altclip_fast.ops", "altclip_fast.kernels"},
    "altclip_fast.apps": LEAVES | {"altclip_fast.modeling", "altclip_fast.ops", "altclip_fast.kernels",
                                   "altclip_fast.preprocessing", "altclip_fast.optimize"},
    # The oracle reuses config, checkpoint reading and output classes; none of those import it.
    "altclip_fast.reference": LEAVES | {"altclip_fast.modeling.config", "altclip_fast.modeling.checkpoint",
                                        "altclip_fast.modeling.outputs", "altclip_fast.ops.activations",
                                        "altclip_fast.kernels.activations"},
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("altclip_fast", *path.relative_to(PACKAGE).with_suffix("").parts))
        yield name.removesuffix(".__init__"), path, path.name == "__init__.py"


def _imports(name: str, path: Path, is_package: bool) -> set[str]:
    found = set()
    base = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {m for m in found if m == "altclip_fast" or m.startswith("altclip_fast.") or m.split(".")[0] in
            ("kernels", "reference")}


def _layer(name: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def _within(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


MODULES = list(_modules())


@pytest.mark.parametrize("name,path,is_package", MODULES, ids=[m[0] for m in MODULES])
def test_imports_follow_the_layers(name, path, is_package):
    layer = _layer(name)
    if layer is None:
        return  # a shared leaf or the package root: checked by the leaf test below
    allowed = ALLOWED[layer] | {layer}
    existing = {m for m, _, _ in MODULES}
    bad = []
    for module in _imports(name, path, is_package):
        if module == "altclip_fast":
            continue  # the package root imports nothing eagerly; the names taken from it are judged below
        root_name = module.removeprefix("altclip_fast.")
        if module not in existing and root_name in altclip_fast._EXPORTS:
            module = f"altclip_fast.{altclip_fast._EXPORTS[root_name]}"  # a public name: judge its module
        if module.split(".")[0] in ("kernels", "reference"):
            bad.append(f"{module} (a generic top-level name: import it under altclip_fast)")
        elif module not in existing and module.rpartition(".")[0] in existing:
            # `from pkg import name` where name is an attribute, not a module: judge the package.
            if not _within(module.rpartition(".")[0], allowed):
                bad.append(module)
        elif module in existing and not _within(module, allowed):
            bad.append(module)
    assert not bad, f"{name} imports {sorted(bad)}; its layer may import only {sorted(allowed)}"


@pytest.mark.parametrize("leaf", sorted(LEAVES - {"altclip_fast"}))
def test_shared_leaves_import_only_leaves(leaf):
    path = ROOT / (leaf.replace(".", "/") + ".py")
    imports = {m for m in _imports(leaf, path, False) if m != "altclip_fast.errors.AltCLIPError"}
    assert all(_within(m, LEAVES) for m in imports), imports


def test_runtime_path_never_loads_the_reference():
    """Loading the fast model, its processor and the CLI leaves altclip_fast.reference unimported."""
    code = (
        "import sys\n"
        "import altclip_fast\n"
        "from altclip_fast import AltCLIPModel, AltCLIPProcessor, optimize\n"
        "import altclip_fast.apps.cli, altclip_fast.apps.embedding.run, altclip_fast.apps.benchmark\n"
        "bad = [m for m in sys.modules if m.startswith('altclip_fast.reference') or m in ('kernels', 'reference')]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_path_resolution_needs_no_torch():
    code = (
        "import sys\n"
        "from altclip_fast.model_files import resolve_model_dir, read_json\n"
        "from altclip_fast.modeling.config import AltCLIPConfig\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
