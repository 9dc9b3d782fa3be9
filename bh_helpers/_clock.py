"""The one UTC timestamp format written into banks, results files and reports.

ISO 8601 to the second with an explicit offset, e.g. ``"2026-12-07T15:04:05+00:00"``.
"""

from __future__ import annotations

import datetime

__all__ = ["utc_timestamp"]


def utc_timestamp() -> str:
    """Now, in UTC, as ISO 8601 to the second (``"2026-12-07T15:04:05+00:00"``).

    Returns
    -------
    str
    """
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
