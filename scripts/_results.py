"""The results scheme of ``benchmarks/results/``: one file per claim, listed in ``INDEX.md``.

A file is named ``<claim>_<device>_<commit>.<ext>``: ``claim`` says what it backs (``bench_gpu``,
``statistics``, ...), ``device`` the machine (``h100``, ``h200``, ``h200x2``, ``cpu``), ``commit`` the
short hash of the code that produced it (``git rev-parse --short=7 HEAD`` at run time). ``INDEX.md``
has one table row per file: the README section it backs, the README block rendered from it (or
``-``), the file, and the command that regenerates it. ``scripts/render_results.py`` finds each
block's files there.

Benchmarks take ``--json`` without a value to write to the scheme's name::

    python benchmarks/bench_statistics.py --json    # benchmarks/results/statistics_<device>_<commit>.json, e.g. statistics_h200_<hash>.json
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INDEX = RESULTS / "INDEX.md"
COLUMNS = ("README section", "block", "file", "regenerate")


def commit() -> str:
    """Short hash of the checked-out code (``nogit`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "nogit"
    return out or "nogit"


def device_name(device: str | None = None) -> str:
    """``h100``, ``h200x2``, ``cpu``...: the GPU model from torch's device name, times the GPU count."""
    import torch

    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        return "cpu"
    words = torch.cuda.get_device_name().replace("-", " ").split()
    model = next((w for w in words if re.fullmatch(r"[A-Za-z]*\d+[A-Za-z]*", w)), "gpu").lower()
    count = torch.cuda.device_count()
    return model if count == 1 else f"{model}x{count}"


def result_path(claim: str, device: str | None = None, ext: str = "json") -> Path:
    """Where a new result of ``claim`` goes: ``benchmarks/results/<claim>_<device>_<commit>.<ext>``."""
    return RESULTS / f"{claim}_{device_name(device)}_{commit()}.{ext}"


def output(value: str | None, claim: str, device: str | None = None, ext: str = "json") -> str | None:
    """Resolve an output option: ``None`` (not asked), ``"scheme"`` (the scheme's name), or a path."""
    if value == "scheme":
        path = result_path(claim, device, ext)
        print(f"results: {path.relative_to(ROOT)} (add it to {INDEX.relative_to(ROOT)}, remove the file it replaces)")
        return str(path)
    return value


def index_rows(text: str | None = None) -> list[dict[str, str]]:
    """The rows of INDEX.md's table, as dicts keyed by ``COLUMNS`` (cells without backticks)."""
    text = INDEX.read_text(encoding="utf-8") if text is None else text
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != len(COLUMNS) or cells[0] == COLUMNS[0] or set(cells[0]) <= {"-", ":"}:
            continue
        rows.append({k: v.strip("`") for k, v in zip(COLUMNS, cells)})
    return rows


def block_files(block: str) -> list[Path]:
    """The results files that README block ``block`` is rendered from, in INDEX order."""
    files = [RESULTS / row["file"] for row in index_rows() if row["block"] == block]
    if not files:
        raise SystemExit(f"{INDEX.relative_to(ROOT)} names no file for README block {block!r}")
    return files


def replace_in_index(old: str, new: str) -> None:
    """Point INDEX.md's row for results file ``old`` at ``new`` (both bare file names)."""
    text = INDEX.read_text(encoding="utf-8")
    if f"`{old}`" not in text:
        raise SystemExit(f"{INDEX.relative_to(ROOT)} has no row for {old}")
    INDEX.write_text(text.replace(f"`{old}`", f"`{new}`"), encoding="utf-8")
