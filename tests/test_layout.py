"""The package's layout (docs/architecture.md): small modules and no import cycle.

The import graph counts every `import` / `from ... import` in a module, at any depth
(imports inside functions too: a lazy import is still a dependency), between mirror_sd
modules only. `from pkg import name` is an edge to the submodule `pkg.name` when there is
one, else to the package's `__init__.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "mirror_sd"
MAX_LINES = 500  # docs/DESIGN.md: small modules (~500 lines)


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names one import statement brings in (candidates, not yet resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, `level - 1` packages up
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest mirror_sd module that `name` is or lies in (None outside the package)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph() -> nx.DiGraph:
    """module -> module it imports, over the mirror_sd package."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = _imported(node, module, is_package)
            if isinstance(node, ast.ImportFrom):
                # `from pkg import sub` is the submodule; `from pkg import name` the package
                subs = [n for n in names[:-1] if n in modules]
                names = subs if len(subs) == len(names) - 1 else [*subs, names[-1]]
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != module:
                    graph.add_edge(module, target)
    return graph


def test_every_module_is_small():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them along a seam): {long}"


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert graph.number_of_edges() > 50  # the walk found the imports
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return
    loop = " -> ".join([a for a, _ in cycle] + [cycle[0][0]])
    tangled = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    raise AssertionError(f"import cycle: {loop}\nmodules that import each other: {tangled}")


def test_relative_imports_resolve_from_the_module_package():
    def names(code: str, module: str, is_package: bool = False) -> list[str]:
        return _imported(ast.parse(code).body[0], module, is_package)

    assert "mirror_sd.graphs.zoo" in names("from .zoo import x", "mirror_sd.graphs.export")
    assert "mirror_sd.graphs.zoo" in names("from . import zoo", "mirror_sd.graphs", True)
    assert "mirror_sd.api" in names("from ..api import x", "mirror_sd.graphs.export")


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()  # cli.py imports its commands' modules lazily, inside functions
    assert graph.has_edge("mirror_sd.cli", "mirror_sd.api")
    assert graph.has_edge("mirror_sd.cli", "mirror_sd.graphs.zoo")
