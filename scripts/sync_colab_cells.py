"""Write the Colab badge and install cell of every notebook from pyproject.toml and :data:`INSTALL_CELL`.

``[tool.bh-routing] repository`` (and ``branch``) is the one place that says where Colab opens
the notebooks from and where their install cells clone the package from. This script rewrites
the badge line and the whole install cell of every ``notebooks/NN_name.py`` and README.md's badges (one template, so the
four copies cannot drift) and re-pairs the ``.ipynb`` files with jupytext. ``tests/test_notebooks.py``
fails when they disagree.

    python scripts/sync_colab_cells.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def colab_source() -> tuple[str, str]:
    """``(repository URL, branch)`` from pyproject.toml."""
    with open(REPO / "pyproject.toml", "rb") as f:
        cfg = tomllib.load(f)["tool"]["bh-routing"]
    return cfg["repository"].rstrip("/"), cfg.get("branch", "main")


def badge_url(name: str) -> str:
    repository, branch = colab_source()
    path = repository.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{path}/blob/{branch}/notebooks/{name}.ipynb"


def repo_url_line() -> str:
    repository, _ = colab_source()
    return f'REPO_URL = os.environ.get("BH_ROUTING_REPO") or "{repository}.git"  # see pyproject.toml [tool.bh-routing]'


#: The install cell (Colab only; elsewhere a no-op). The package comes from, first found: a checkout
#: around the notebook, ``BH_ROUTING_DIR`` (e.g. a mounted Google Drive folder), a wheel uploaded next to
#: the notebook, else a clone of ``REPO_URL``; when none works the cell stops with one message naming
#: the three ways in (no traceback).
INSTALL_CELL = """import importlib
import os
import subprocess
import sys
from pathlib import Path

IN_COLAB = "google.colab" in sys.modules
{repo_url_line}
PIP_INSTALL = ["-m", "pip", "install", "-q", "-e", ".[notebooks]", "transformers>=5.23,<6"]
WAYS_IN = (
    "Ways in: (1) set BH_ROUTING_REPO to a repository Colab can clone (your fork's URL: "
    "os.environ['BH_ROUTING_REPO'] = '<git URL>') and rerun this cell; "
    "(2) build a wheel with `python -m pip wheel --no-deps -w dist .` in a checkout, upload "
    "dist/bh_routing-*.whl with the Files panel and rerun; (3) put a checkout in Google Drive, mount it "
    "and set BH_ROUTING_DIR to its folder. README.md, section 'Colab', says the same."
)
if IN_COLAB:
    here = Path.cwd()
    repo = here.parent if (here.parent / "pyproject.toml").is_file() else Path(
        os.environ.get("BH_ROUTING_DIR") or here / "bh-routing")
    wheels = sorted(here.glob("bh_routing-*.whl"))
    if not (repo / "pyproject.toml").is_file() and not wheels:
        clone = subprocess.run(["git", "clone", "--depth", "1", REPO_URL, str(repo)], capture_output=True, text=True)
        if clone.returncode != 0:
            reason = (clone.stderr or "").strip().splitlines()[-1:] or ["git failed"]
            raise SystemExit(f"Cannot install bh-routing: cloning {{REPO_URL}} failed ({{reason[0]}}). {{WAYS_IN}}")
    if (repo / "pyproject.toml").is_file():
        install = subprocess.run([sys.executable, *PIP_INSTALL], cwd=repo)
        sys.path.insert(0, str(repo))  # the editable install is only seen by new processes
    else:
        install = subprocess.run([sys.executable, *PIP_INSTALL[:4], f"{{wheels[-1]}}[notebooks]", PIP_INSTALL[-1]])
    if install.returncode != 0:
        raise SystemExit(f"Cannot install bh-routing: pip failed (its output is above). {{WAYS_IN}}")
    importlib.invalidate_caches()
    if (repo / "notebooks").is_dir():
        os.chdir(repo / "notebooks")  # outputs/ then lands next to the notebooks, as locally
"""

_CELL = re.compile(r"^(# %%\n)import (?:importlib|os)\n.*?^IN_COLAB = .*?(?=^# %%)", re.MULTILINE | re.DOTALL)


def install_cell() -> str:
    """The install cell's source, with this repository's ``REPO_URL`` line."""
    return INSTALL_CELL.format(repo_url_line=repo_url_line())


def main() -> int:
    sources = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py"))
    for path in sources:
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"\(https://colab\.research\.google\.com/github/[^)]*\)", f"({badge_url(path.stem)})", text, count=1)
        text, found = _CELL.subn(lambda m: m.group(1) + install_cell() + "\n", text, count=1)
        if not found:
            raise SystemExit(f"{path.name}: no install cell (a code cell with IN_COLAB = ...) to rewrite")
        path.write_text(text, encoding="utf-8")
    readme = REPO / "README.md"  # its Colab badges, one per notebook
    text = readme.read_text(encoding="utf-8")
    for path in sources:
        text = re.sub(rf"\(https://colab\.research\.google\.com/github/[^)]*/notebooks/{path.stem}\.ipynb\)",
                      f"({badge_url(path.stem)})", text)
    readme.write_text(text, encoding="utf-8")
    subprocess.run([sys.executable, "-m", "jupytext", "--sync", *map(str, sources)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
