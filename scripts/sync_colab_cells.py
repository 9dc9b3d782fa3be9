"""Copy the Colab source set in pyproject.toml into every notebook (badge + install cell).

``[tool.bh-routing] repository`` (and ``branch``) is the one place that says where Colab opens
the notebooks from and where their install cells clone the package from. This script rewrites
the badge line and the ``REPO_URL`` line of every ``notebooks/NN_name.py`` from it and re-pairs
the ``.ipynb`` files with jupytext. ``tests/test_notebooks.py`` fails when they disagree.

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


def main() -> int:
    sources = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py"))
    for path in sources:
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"\(https://colab\.research\.google\.com/github/[^)]*\)", f"({badge_url(path.stem)})", text, count=1)
        text = re.sub(r"^REPO_URL = .*$", repo_url_line(), text, count=1, flags=re.MULTILINE)
        path.write_text(text, encoding="utf-8")
    subprocess.run([sys.executable, "-m", "jupytext", "--sync", *map(str, sources)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
