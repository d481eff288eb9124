"""The package's structure, read from its source: the engine never imports the test bed, no module
imports itself back through others, and every import points down the layers below (every import counts,
function-level ones too, so a circle cannot hide inside a function). Importing `a.b.c` from outside `a.b`
also runs `a.b`'s `__init__`: that edge counts."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import dataengine

PACKAGE = Path(dataengine.__file__).parent
TESTBED = "dataengine.testbed"
#: the subpackages, lowest first; a module imports its own subpackage and lower layers only. Modules at
#: the package root (the CLI, its console, the job entry point) sit above `analysis`; `dataengine`
#: itself (the version) is below everything.
LAYERS = [["core"], ["models", "llm"], ["dedup", "io"], ["ops"], ["train"], ["eval"], ["engine"], ["analysis"],
          ["(root)"], ["testbed"]]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """Our modules an import statement runs (the named module, or the package a name comes from)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        while name.startswith("dataengine.") and not module.startswith(name + "."):
            found.add(name)  # the module, and each enclosing package the importer is not inside
            name = name.rpartition(".")[0]
    return found - {module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= _imported(name, path, node, modules)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_engine_never_imports_the_test_bed():
    graph = import_graph()
    engine = {m for m in graph if not (m == TESTBED or m.startswith(TESTBED + "."))}
    assert len(engine) > 50 and len(graph) - len(engine) > 10  # the walk saw both
    wrong = sorted(f"{m} -> {t}" for m in engine for t in graph[m] if t.startswith(TESTBED))
    assert wrong == []


def test_no_import_circles():
    assert circles(import_graph()) == []


def layer_of(module: str) -> tuple[int, str]:
    """(layer, subpackage) of a module: `dataengine.ops.base` -> ops's layer."""
    if module == "dataengine":
        return -1, "dataengine"
    head = module.split(".")[1]
    package = head if (PACKAGE / head).is_dir() else "(root)"
    return next(i for i, names in enumerate(LAYERS) if package in names), package


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        (layer, package) = layer_of(module)
        for target in targets:
            (target_layer, target_package) = layer_of(target)
            if target_package != package and target_layer >= layer:
                wrong.append(f"{module} ({package}) -> {target} ({target_package})")
    return sorted(wrong)


def test_every_subpackage_has_a_layer_and_imports_point_down():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == {name for layer in LAYERS for name in layer} - {"(root)"}
    assert upward_imports(import_graph()) == []


def test_the_checks_see_a_circle_and_a_test_bed_import(tmp_path, monkeypatch):
    """The walk itself: a planted circle and a planted engine -> test bed import are found."""
    root = tmp_path / "dataengine"
    for name, text in {"__init__.py": "", "a.py": "from dataengine import b\n",
                       "b.py": "def f():\n    from dataengine.a import x\n",
                       "testbed/__init__.py": "", "testbed/t.py": "", "c.py": "from .testbed import t\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", root)
    graph = import_graph()
    assert circles(graph) == [["dataengine.a", "dataengine.b"]]
    assert "dataengine.testbed.t" in graph["dataengine.c"]


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    root = tmp_path / "dataengine"
    for name, text in {"__init__.py": "", "core/__init__.py": "", "core/columns.py": "from dataengine.ops import base\n",
                       "ops/__init__.py": "", "ops/base.py": "from dataengine.core import columns\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", root)
    assert upward_imports(import_graph()) == ["dataengine.core.columns (core) -> dataengine.ops (ops)",
                                              "dataengine.core.columns (core) -> dataengine.ops.base (ops)"]
