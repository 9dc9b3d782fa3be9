"""The package's shape: small modules and functions, the README's module table current, the public
contract importable from ``bh_helpers`` and from the modules that define it (read with ``ast``
where possible; nothing here times anything)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bh_helpers"
MAX_MODULE_LINES = 500  # longer only with a "Why one module:" paragraph in the module docstring
MAX_APP_LINES = 1600  # app/ wires the floors (argparse, the demo, paths, notebook settings, widgets)
MAX_FUNCTION_CODE_LINES = 80  # without a reason: a comment starting "# long:" inside the function

#: The public contract (names other code relies on, listed in README's API section): name -> defining module.
CONTRACT = {
    "fdr_counts": "bh_helpers.selection.reference",
    "select_experts": "bh_helpers.selection.reference",
    "Selection": "bh_helpers.selection.reference",
    "fit_null": "bh_helpers.nulls.fit",
    "fit_null_bank": "bh_helpers.nulls.fit",
    "NullModel": "bh_helpers.nulls.model",
    "NullBank": "bh_helpers.nulls.bank",
    "load_model": "bh_helpers.models.loading",
    "capture_router_logits": "bh_helpers.capture",
    "route": "bh_helpers.routing.patch",
    "BHSelector": "bh_helpers.selection.selectors",
    "TopKSelector": "bh_helpers.selection.selectors",
    "TopPSelector": "bh_helpers.selection.selectors",
    "NativeSelector": "bh_helpers.selection.selectors",
    "RoutingRecorder": "bh_helpers.routing.recorder",
    "StaticLayerSelector": "bh_helpers.selection.static",
    "fit_static_allocation": "bh_helpers.experiments.static_allocation",
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "data" not in p.relative_to(PACKAGE).parts)


def _code_lines(path: Path, node: ast.AST) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")[node.lineno - 1:node.end_lineno]
    doc = ast.get_docstring(node)
    code = [line for line in lines if line.strip() and not line.strip().startswith("#")]
    return code[: len(code) - (len(doc.split("\n")) if doc else 0)] if doc else code


def test_no_module_is_crowded():
    def justified(path: Path) -> bool:
        return "Why one module:" in (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "")

    long = {str(p.relative_to(ROOT)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES and not justified(p)}
    assert not long, (f"modules over {MAX_MODULE_LINES} lines (split them by concern, or say in the docstring "
                      f"'Why one module: ...'): {long}")


def test_app_floor_only_wires():
    lines = sum(len(p.read_text().splitlines()) for p in (PACKAGE / "app").glob("*.py"))
    assert lines < MAX_APP_LINES, f"bh_helpers/app/ has {lines} lines; move science down to its floor"


def _long_functions(path: Path) -> list[str]:
    """Functions of ``path`` over the limit (lines of code: the ``def`` and body, no docstring,
    comment or blank line) without a ``# long:`` reason inside."""
    text = path.read_text(encoding="utf-8")
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = len(_code_lines(path, node))
            if n > MAX_FUNCTION_CODE_LINES and "# long:" not in "\n".join(text.split("\n")[node.lineno - 1:node.end_lineno]):
                out.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_long_function_without_a_reason():
    long = [f for path in _modules() for f in _long_functions(path)]
    assert not long, "functions over 80 lines of code without a '# long:' reason:\n" + "\n".join(long)


def test_the_long_function_check_can_fail(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    \"\"\"Doc.\"\"\"\n    # a comment\n\n" + "    x = 1\n" * 79)
    assert _long_functions(path) == []  # def + 79 lines = 80: at the limit
    path.write_text("def f():\n    \"\"\"Doc.\"\"\"\n" + "    x = 1\n" * 80)
    assert _long_functions(path) == ["m.py:1 f (81 lines)"]
    path.write_text("def f():\n    # long: one table, read top to bottom\n" + "    x = 1\n" * 80)
    assert _long_functions(path) == []


def test_readme_module_table_is_current():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "module_table.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "module_table.py")],
                           capture_output=True, text=True).stdout
    listed = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    on_disk = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in _modules() if p.name != "__init__.py"}
    assert listed == on_disk  # every module has its row, no row without a module


def _render_results():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import render_results
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return render_results


def test_readme_results_blocks_are_the_committed_files():
    """Every measurement table in README.md is the rendering of the results file INDEX.md names for
    it; INDEX.md lists exactly the files in benchmarks/results/, named <claim>_<device>_<commit>."""
    import re

    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_results.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr  # names the blocks and the fix: python scripts/render_results.py
    rr = _render_results()
    rows = rr.index_rows()
    listed = [row["file"] for row in rows]
    on_disk = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir() if p.name not in ("INDEX.md", "NOTES.md"))
    assert sorted(listed) == on_disk and len(set(listed)) == len(listed)
    scheme = re.compile(r"[a-z0-9_]+_(cpu|[a-z]+\d+[a-z]*(x\d+)?)_[0-9a-f]{7}\.(json|txt)")
    assert [f for f in listed if not scheme.fullmatch(f)] == []
    assert {row["block"] for row in rows} - {"-"} == set(rr.BLOCKS)
    assert all(row["regenerate"] for row in rows)


def test_readme_results_check_fails_on_an_edited_cell():
    """The blocks live on the docs/ pages; an edited cell, a lost marker or a block on two pages is stale."""
    rr = _render_results()
    pages = rr.read_pages()
    assert rr.stale(pages) == []
    gpu, t4 = ROOT / "docs" / "gpu.md", ROOT / "docs" / "t4.md"
    assert rr.stale({**pages, gpu: pages[gpu].replace("| native top-8 | 114,554 |", "| native top-8 | 114,555 |")}) \
        == ["gpu"]
    assert rr.stale({**pages, t4: pages[t4].replace("<!-- end t4 -->", "")}) == ["t4"]
    readme = ROOT / "README.md"
    assert rr.stale({**pages, readme: pages[readme] + "\n" + rr.render("gpu", readme)}) == ["gpu"]


def test_generated_blocks_check_fails_when_stale(tmp_path):
    """readme_answer.py and module_table.py --check fail on a changed block, wherever it lives."""
    import shutil

    for script, page, needle in (("readme_answer.py", "docs/results.md", "| prose:confirm | bh a="),
                                 ("module_table.py", "docs/development.md", "| `bh_helpers.capture` |")):
        path = ROOT / page
        text = path.read_text(encoding="utf-8")
        assert needle in text
        backup = tmp_path / path.name
        shutil.copyfile(path, backup)
        try:
            path.write_text(text.replace(needle, needle + " edited", 1), encoding="utf-8")
            res = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--check"],
                                 capture_output=True, text=True)
            assert res.returncode == 1 and page in res.stderr, (script, res.stderr)
        finally:
            shutil.copyfile(backup, path)


def test_readme_is_a_users_document():
    """README: what it is, Colab, the two commands and how to read the answer on the first screen;
    the detailed pages under docs/ it links to exist; under 120 lines."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = readme.splitlines()
    assert len(lines) < 120
    first = "\n".join(lines[:45])
    for needle in ("colab-badge.svg", "pip install torch==2.13.0 -r requirements.txt -e . && bh-routing demo",
                   "python -m pytest -q tests notebooks --nbmake", "**Reading the answer.**", "## Verdict"):
        assert needle in first, needle
    import re

    for target in re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme):
        assert (ROOT / target).is_file(), target
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line for line in ci.splitlines() if line.startswith("pip install"))
    assert f"```bash\n{command}\n```" in readme, ".ci/run runs the README's second command verbatim"


def test_no_reference_to_a_missing_results_file():
    """Code, tests, notebooks and docs name only files that are in benchmarks/results/."""
    import re

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    missing = set()
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".py", ".ipynb", ".md", ".toml", ".txt", ".sh", ".yml", ".cfg") or not path.is_file():
            continue
        for ref in re.findall(r"(?<![:\w/])benchmarks/results/([\w.-]+\.(?:json|txt|md))", path.read_text(encoding="utf-8", errors="replace")):
            if not (ROOT / "benchmarks" / "results" / ref).is_file():
                missing.add(f"{name}: {ref}")
    assert sorted(missing) == []


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_public_contract_is_importable_from_bh_helpers_and_its_module(name):
    import bh_helpers

    defined = getattr(importlib.import_module(CONTRACT[name]), name)
    assert getattr(bh_helpers, name) is defined
    assert name in dir(bh_helpers)


def test_import_bh_helpers_stays_light():
    """``import bh_helpers`` loads no torch, transformers or matplotlib (public names load on use)."""
    code = "import sys, bh_helpers; print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import bh_helpers

        bh_helpers.nope  # noqa: B018
