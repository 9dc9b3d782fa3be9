"""The package's modules import each other without a circle (read with ``ast``, nothing imported).

Every ``import bh_helpers.x`` and ``from bh_helpers.x import y`` counts, at module level or inside a
function: a lazy import hides a circle from Python, not from a reader. ``from bh_helpers import
__version__`` (the package's own ``__init__``) is left out: that module holds the version and
re-exports, and imports nothing back at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bh_helpers"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of bh_helpers it imports}`` for every module of the package."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in modules and node.module != "bh_helpers":
                    deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
        graph[name] = deps - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary circle, each once (rotated to start at its smallest name)."""
    cycles: set[tuple[str, ...]] = set()

    def walk(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                cycle = path[path.index(dep):]
                start = cycle.index(min(cycle))
                cycles.add(tuple(cycle[start:] + cycle[:start]))
            elif len(path) < len(graph):
                walk(dep, path + [dep])

    for node in sorted(graph):
        walk(node, [node])
    return [list(c) for c in sorted(cycles)]


def test_find_cycles_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_circle_between_package_modules():
    graph = import_graph()
    assert "bh_helpers.routing.patch" in graph and "bh_helpers.selection.reference" in graph["bh_helpers.routing.patch"]
    assert find_cycles(graph) == []
