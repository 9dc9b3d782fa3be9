"""README sections that scripts generate: the text between a start and an end marker."""

from __future__ import annotations


def replace_section(text: str, start: str, end: str, section: str) -> str:
    """``text`` with everything from ``start`` to ``end`` (both included) replaced by ``section``.

    ``section`` must carry the markers itself, so a later run finds them again.
    """
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    return head + section + rest.split(end, 1)[1]
