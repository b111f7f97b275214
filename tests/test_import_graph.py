"""The import graph of the ``meter`` package has no cycle, except the known ones listed here.

The graph is read from the source with :mod:`ast` (nothing is imported, so this runs in milliseconds):
an edge for every ``import`` a module runs, at its top or inside a function (an import moved into a
function only postpones a cycle), but not those under ``if TYPE_CHECKING:``, which never run. Importing
``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``; those count as edges too, except for the
packages the importing module sits in (already initialised by the time its code runs).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import meter

PACKAGE = Path(meter.__file__).parent

# Cycles outside the CLI and the admin API, left for their owners. Remove an entry once it is broken;
# a cycle not listed here fails the test.
KNOWN_CYCLES: set[frozenset[str]] = set()  # none: keep it so


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["meter", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module ``name`` is, or the module it is an attribute of; None outside meter."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.AST, module: str) -> Iterator[str]:
    """The dotted names the import statements under ``node`` import (``from a import b``: ``a.b``,
    which :func:`_resolve` turns into ``a`` when ``b`` is not a module)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for branch in child.orelse:
                yield from _imported(ast.Module(body=[branch], type_ignores=[]), module)
        elif isinstance(child, ast.Import):
            yield from (alias.name for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                package = module.split(".")
                if MODULES[module].name != "__init__.py":
                    package.pop()
                package = package[: len(package) - child.level + 1]
                base = ".".join([*package, base] if base else package)
            yield base
            yield from (f"{base}.{alias.name}" for alias in child.names)
        else:
            yield from _imported(child, module)


def _edges(module: str) -> set[str]:
    """The meter modules ``module`` runs when imported: each imported module, and each package
    ``__init__`` on the way to it that ``module`` is not inside."""
    edges = set()
    for name in _imported(ast.parse(MODULES[module].read_text()), module):
        target = _resolve(name)
        if target is None:
            continue
        parts = target.split(".")
        for depth in range(1, len(parts) + 1):
            step = ".".join(parts[:depth])
            if not (module == step or module.startswith(step + ".")):
                edges.add(step)
    return edges


GRAPH = {module: _edges(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_whole_package() -> None:
    assert {"meter.app", "meter.cli.main", "meter.admin", "meter.admin.auth"} <= GRAPH.keys()
    assert "meter.cli.context" in GRAPH["meter.cli.usage"]
    assert "meter.tenancy" in GRAPH["meter.billing.catalog"]  # a package's __init__ runs first
    assert "meter.sinks.requestlog" in GRAPH["meter.cli.serve"]  # imported inside a function


def test_a_cycle_is_found_wherever_it_hides() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == {frozenset({"a", "b", "c"})}


def test_no_import_cycle_but_the_known_ones() -> None:
    cycles = _cycles(GRAPH)
    assert cycles - KNOWN_CYCLES == set(), "new import cycle(s)"
    assert KNOWN_CYCLES - cycles == set(), "broken: remove from KNOWN_CYCLES"


def test_cli_and_admin_modules_are_in_no_cycle() -> None:
    for cycle in KNOWN_CYCLES:
        assert not any(m.startswith(("meter.cli", "meter.admin")) for m in cycle)


def test_the_cli_context_imports_no_command_module() -> None:
    assert {m for m in GRAPH["meter.cli.context"] if m.startswith("meter.cli.")} == set()


def test_the_cli_does_not_import_the_admin_http_layer() -> None:
    for module, edges in GRAPH.items():
        if module.startswith("meter.cli"):
            assert not any(edge.startswith("meter.admin") for edge in edges), module
