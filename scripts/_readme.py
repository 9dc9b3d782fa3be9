"""Generated sections of the README and of the detailed pages under ``docs/``: the text between a
start and an end marker, wherever it lives.

The README is a user's document; the measurement tables, the demo's answer and the module table sit
on the pages under ``docs/`` it links to. Each generator looks its markers up in :data:`PAGES` (the
README first, then every ``docs/*.md``), so a block can move between pages without touching a script,
and links in a block are written relative to the page that holds it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def pages() -> list[Path]:
    """The documents that may hold generated blocks: README.md, then docs/*.md (the copied reports excluded)."""
    return [README, *sorted(p for p in (ROOT / "docs").glob("*.md")
                            if p.name not in ("demo_report.md", "full_protocol_report.md"))]


def page_with(start: str) -> Path:
    """The one page that holds the marker ``start``."""
    found = [p for p in pages() if start in p.read_text(encoding="utf-8")]
    if len(found) != 1:
        where = ", ".join(str(p.relative_to(ROOT)) for p in found) or "no page"
        raise SystemExit(f"the marker {start} must be on exactly one of README.md and docs/*.md; found on {where}")
    return found[0]


def relative_links(text: str, page: Path) -> str:
    """``text`` with markdown links to repository paths (``](docs/...)``, ``](benchmarks/...)``) made
    relative to ``page``'s folder, so they work on GitHub from any page."""
    def fix(match: re.Match[str]) -> str:
        target = ROOT / match.group(1)
        return "](" + Path(os.path.relpath(target, page.parent)).as_posix() + ")"

    return re.sub(r"\]\(((?:docs|benchmarks|bh_helpers|scripts|notebooks)/[^)\s]+)\)", fix, text)


def replace_section(text: str, start: str, end: str, section: str) -> str:
    """``text`` with everything from ``start`` to ``end`` (both included) replaced by ``section``.

    ``section`` must carry the markers itself, so a later run finds them again.
    """
    if start not in text or end not in text:
        raise SystemExit(f"no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    return head + section + rest.split(end, 1)[1]
