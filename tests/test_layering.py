"""Dependencies point one way: apps -> optimize/modeling -> preprocessing/ops -> kernels; and inside the
layers, file by file, no import circles, no private names taken from another module, and short files
and functions in apps.

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


# ---------------------------------------------------------------------------------------------- file by file
# The package's files, checked one by one (not layer by layer, as the tests above do):
#
# - no import circle between files, counting the imports inside functions, which hide circles from
#   Python but not from a reader;
# - no ``from .x import _name``: a private name stays in its module (a module whose name starts with an
#   underscore may be imported as a module);
# - in ``apps``, no module longer than about 450 lines and no function longer than about 60, except the
#   argparse builders and the exceptions listed below with their reason.

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
ARGPARSE_BUILDERS = {"build_parser", "add_arguments"}
# module -> reason: the few files allowed past MAX_MODULE_LINES.
LONG_MODULES: dict[str, str] = {}
# "module:function" -> reason.
LONG_FUNCTIONS: dict[str, str] = {}


def _files() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("altclip_fast", *path.relative_to(PACKAGE).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


FILES = _files()


def _import_statements(name: str) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` for every import statement of ``name``, relative ones resolved."""
    path, is_package = FILES[name]
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            anchor = base[: len(base) - (node.level - 1)] if node.level else []
            module = ".".join(anchor + ([node.module] if node.module else []))
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return [f for f in found if f[0] == "altclip_fast" or f[0].startswith("altclip_fast.")]


def _targets(module: str, names: list[str]) -> set[str]:
    """The files an import statement loads: each imported submodule, else the module itself (a public
    name of the package root counts as the module that defines it)."""
    targets = set()
    for name in names or [None]:
        if name and f"{module}.{name}" in FILES:
            targets.add(f"{module}.{name}")
        elif module == "altclip_fast" and name in altclip_fast._EXPORTS:
            targets.add(f"altclip_fast.{altclip_fast._EXPORTS[name]}")
        elif module in FILES:
            targets.add(module)
    return targets


def _graph() -> dict[str, set[str]]:
    return {name: set().union(*[_targets(m, ns) for m, ns, _ in _import_statements(name)]) - {name} for name in FILES}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_between_files():
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _circles(graph) == [["a", "b", "c"]]


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for name in FILES:
        for module, names, line in _import_statements(name):
            private = [n for n in names if n.startswith("_") and f"{module}.{n}" not in FILES]
            if private and module != name:
                bad.append(f"{FILES[name][0].relative_to(ROOT)}:{line} imports {private} from {module}")
    assert not bad, "\n".join(bad)


APPS = sorted(n for n in FILES if n.startswith("altclip_fast.apps"))


@pytest.mark.parametrize("name", APPS)
def test_apps_modules_and_functions_stay_short(name):
    path, _ = FILES[name]
    text = path.read_text()
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES or name in LONG_MODULES, f"{name} has {lines} lines"
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and node.name not in ARGPARSE_BUILDERS \
                    and f"{name}:{node.name}" not in LONG_FUNCTIONS:
                long.append(f"{node.name} ({length} lines)")
    assert not long, f"{name}: {long}"
