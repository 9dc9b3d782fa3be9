"""Plain GitHub-markdown tables (no ``tabulate`` dependency), shared by every floor that writes one.

:func:`markdown_table` is re-exported by :mod:`bh_helpers.report.write`; it sits below every floor so
that :mod:`bh_helpers.experiments.categories` can format its tables without importing the report floor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["markdown_table"]


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return format(value, floatfmt)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _cell(value.item(), floatfmt)
    text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows, *, columns: Sequence[str] | None = None, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured markdown table.

    Parameters
    ----------
    rows : pandas.DataFrame or sequence of mapping
        The table body; a DataFrame's columns (or the first row's keys) give the header.
    columns : sequence of str, optional
        Columns to show, in this order (default: all).
    floatfmt : str, default ".4g"
        ``format`` spec of float cells (``NaN`` is written ``n/a``; strings are kept as they are).

    Returns
    -------
    str
        Header line, separator line, one line per row (no trailing newline).

    Examples
    --------
    >>> print(markdown_table([{"a": 1, "b": 0.5}, {"a": 2, "b": float("nan")}]))
    | a | b |
    |---|---|
    | 1 | 0.5 |
    | 2 | n/a |
    """
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        records = rows.to_dict(orient="records")
        names = list(columns) if columns is not None else [str(c) for c in rows.columns]
    else:
        records = [dict(r) for r in rows]
        names = list(columns) if columns is not None else (list(records[0]) if records else [])
    if not names:
        raise ValueError("`rows` has no columns; pass a non-empty table or `columns=`.")
    missing = [c for c in names if records and c not in records[0]]
    if missing:
        raise ValueError(f"`columns` names {missing}, which `rows` does not have.")
    lines = ["| " + " | ".join(_cell(n, floatfmt) for n in names) + " |", "|" + "|".join("---" for _ in names) + "|"]
    for rec in records:
        lines.append("| " + " | ".join(_cell(rec.get(n), floatfmt) for n in names) + " |")
    return "\n".join(lines)
