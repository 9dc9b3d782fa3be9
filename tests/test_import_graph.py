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


#: The floors of the data flow, bottom to top (the package docstring draws the same line). A module
#: may import from its own floor and the floors below, never from a floor above.
FLOORS = (
    ("bh_helpers._validate", "bh_helpers._cuda", "bh_helpers._locks", "bh_helpers._clock", "bh_helpers._markdown",
     "bh_helpers.data"),
    ("bh_helpers.models",),
    ("bh_helpers.capture",),
    ("bh_helpers.nulls",),
    ("bh_helpers.selection",),
    ("bh_helpers.routing",),
    ("bh_helpers.engines",),
    ("bh_helpers.evaluation",),
    ("bh_helpers.experiments",),
    ("bh_helpers.report",),
    ("bh_helpers.app",),
)


def floor_of(module: str) -> int:
    """The floor number of a module of the package (the package's ``__init__`` sits on top)."""
    if module in ("bh_helpers", "bh_helpers.__main__"):  # the package and `python -m bh_helpers` sit on top
        return len(FLOORS)
    for number, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return number
    raise AssertionError(f"{module} is on no floor of FLOORS; add it there")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import of a module from a floor above its own."""
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if floor_of(d) > floor_of(m))


def test_upward_imports_are_found_on_a_hand_made_graph():
    graph = {"bh_helpers.models.texts": {"bh_helpers.evaluation.data"}, "bh_helpers.app.cli": {"bh_helpers.capture"}}
    assert upward_imports(graph) == ["bh_helpers.models.texts -> bh_helpers.evaluation.data"]


def test_every_module_is_on_a_floor_and_no_module_imports_from_a_floor_above():
    graph = import_graph()
    for module in graph:
        floor_of(module)  # raises for a module on no floor
    assert upward_imports(graph) == []
