"""Every module imports on its own, and no meshd module imports itself back through others.

(1) Import each module alone, with no other `meshd.*` module loaded first (as python-zeroconf's
test suite does): a module that only works after some other import hides an order dependency.
(2) Read every `import` / `from ... import` with `ast`, at module level and inside functions
(a lazy import is a cycle too, only deferred), `if TYPE_CHECKING:` blocks excepted, and check
that the graph of meshd modules has no cycle.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import meshd

PACKAGE_DIR = Path(meshd.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _meshd_modules() -> dict[str, ModuleType]:
    return {n: m for n, m in sys.modules.items() if n == "meshd" or n.startswith("meshd.")}


@pytest.fixture
def clean_meshd_modules() -> Iterator[None]:
    """No meshd module loaded; afterwards the same module objects as before (others stay: a
    C extension must not be loaded twice)."""
    saved = _meshd_modules()
    for name in saved:
        del sys.modules[name]
    try:
        yield
    finally:
        for name in _meshd_modules():
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports_alone(name: str, clean_meshd_modules: None) -> None:
    module = importlib.import_module(name)
    assert module.__name__ == name


# --- the import graph --------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str) -> Iterator[str]:
    """Every module name an import statement anywhere in `tree` names (TYPE_CHECKING excepted)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                parent = ".".join([*base, node.module] if node.module else base)
            else:
                parent = node.module or ""
            yield parent
            # `from meshd import crypto` imports the module meshd.crypto.
            yield from (f"{parent}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def _with_parents(name: str) -> Iterator[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and then a/b/c."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for target in _imports(ast.parse(path.read_text(), str(path)), package):
            edges.update(t for t in _with_parents(target) if t in MODULES)
        # A module's own packages are imported before it: not an edge back.
        edges -= {name, *_with_parents(name)}
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan, then a path inside)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:
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
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    start = min(comp)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in comp)
        back = [w for w in nxt if w in seen]
        if back:
            return [*path[path.index(back[0]) :], back[0]]
        path.append(nxt[0])
        seen.add(nxt[0])


def test_the_cycle_finder_finds_lazy_and_relative_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from meshd.x import X\n"
        "def f():\n    from . import y\n    import meshd.z.w\n"
    )
    names = set(_imports(tree, "meshd.pkg"))
    assert "meshd.x" not in names
    assert {"meshd.pkg.y", "meshd.z.w"} <= names


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
