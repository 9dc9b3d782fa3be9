"""The README's API example runs as printed, from any working directory (the committed null bank
ships inside the package, so nothing depends on the checkout)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_example_runs_from_anywhere(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) == 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "BH_ROUTING_KDE_MODELS": ""}
    res = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "mean experts per token:" in res.stdout and "def fibonacci(n):" in res.stdout
    assert list(tmp_path.iterdir()) == []  # wrote nothing where it ran
