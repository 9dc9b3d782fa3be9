"""Print the README's module table from the package itself: one row per module, its docstring's first line.

    python scripts/module_table.py            # print the table
    python scripts/module_table.py --check    # exit 1 when README.md's table differs

Read with ``ast`` (nothing is imported), in data-flow order: the floors listed in
``bh_helpers/__init__.py``'s docstring, then the shared helpers.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from _readme import replace_section  # scripts/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bh_helpers"
FLOORS = ["models", "capture.py", "nulls", "selection", "routing", "evaluation", "experiments", "report", "engines", "app"]
BEGIN, END = "<!-- module table: python scripts/module_table.py -->", "<!-- end module table -->"


def _summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
    return re.sub(r":\w+:`~?", "`", first).replace("``", "`")  # Sphinx roles and literals -> markdown code


def _modules() -> list[Path]:
    out: list[Path] = []
    for floor in FLOORS:
        path = PACKAGE / floor
        if path.suffix == ".py":
            out.append(path)
        else:
            out += sorted(p for p in path.glob("*.py") if p.name != "__init__.py")
    out += sorted(PACKAGE.glob("_*.py"))
    return [p for p in out if p.name != "__init__.py"]


def table() -> str:
    rows = ["| module | what it holds |", "|---|---|"]
    for path in _modules():
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        rows.append(f"| `{name}` | {_summary(path)} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        current = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip() if BEGIN in readme else ""
        if current != table():
            print("README.md's module table is out of date: python scripts/module_table.py --write", file=sys.stderr)
            return 1
        return 0
    if argv == ["--write"]:
        path = ROOT / "README.md"
        readme = path.read_text(encoding="utf-8")
        path.write_text(replace_section(readme, BEGIN, END, f"{BEGIN}\n{table()}\n{END}"), encoding="utf-8")
        return 0
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
