"""The package's structure: layers point down and no module imports, however indirectly, itself.

Imports inside functions count: a cycle hidden in a function body still ties two modules
together. The layer order is the import-linter contract in pyproject.toml (`make test` runs
`lint-imports` too); this test reads the same contract so that the two cannot drift apart.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bloodcell"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, modules: set[str], package_dir: Path = PACKAGE) -> set[str]:
    """Every module of ``modules`` that ``path`` imports, at top level or inside functions."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            # the longest known module the target names (a name imported from a module is not a module)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: imported_modules(path, modules) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def ignoring_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exports its modules; importing the package is importing what it re-exports,
    so the edges into an __init__ are followed through to its modules, and its own edges dropped."""
    packages = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()}
    resolved = {}
    for name, targets in graph.items():
        if name in packages:
            continue
        out = set()
        for target in targets:
            out |= {t for t in graph[target] if t.startswith(target + ".")} if target in packages else {target}
        resolved[name] = out - {name}
    return resolved


def test_the_checker_sees_imports_inside_functions_and_finds_cycles(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    source = package / "sub" / "m.py"
    source.write_text("import os\n\ndef f():\n    from .x import y\n    from ..top import name\n    import pkg.other\n")
    found = imported_modules(source, {"pkg.sub.x", "pkg.top", "pkg.other", "pkg.sub.m"}, package)
    assert found == {"pkg.sub.x", "pkg.top", "pkg.other"}


def test_no_module_imports_itself_through_others():
    graph = ignoring_packages(import_graph())
    assert len(graph) > 40  # the walk saw the package
    assert cycles(graph) == []


def test_layers_point_down():
    """Every import goes to the same layer or one below it, as pyproject.toml's contract orders them."""
    import tomllib

    contract = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    rank = {}
    for level, entry in enumerate(contract["layers"]):
        for layer in entry.split("|"):
            rank[layer.strip()] = level
    graph = import_graph()

    def layer_of(module: str) -> str | None:
        return next((layer for layer in rank if module == layer or module.startswith(layer + ".")), None)

    upward = [(a, b) for a, targets in graph.items() for b in targets
              if layer_of(a) and layer_of(b) and layer_of(a) != layer_of(b) and rank[layer_of(b)] <= rank[layer_of(a)]]
    assert upward == []
