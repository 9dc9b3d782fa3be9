"""One writer per output: an exclusive lock file held while a command writes a folder or results file.

Without it two processes appending to one results file duplicated rows, and two demos starting on
one fresh folder left it holding two grids (every later rerun refused). The lock is a
``filelock.FileLock`` (an OS lock: released by the OS when its process dies, so a killed run never
wedges the next one) on ``<target>.lock``; the holder's pid is written beside it so that the refused
process can say who holds it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["exclusive"]


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, *, what: str, flag: str) -> Iterator[None]:
    """Hold ``lock_path`` for the block, or raise ValueError at once when another process holds it.

    Parameters
    ----------
    lock_path : path-like
        The lock file (its folder must exist).
    what : str
        What is being written, for the message (e.g. ``"output folder 'run'"``).
    flag : str
        The option that chooses another target (e.g. ``"--out"``).
    """
    lock_path = Path(lock_path)
    owner = lock_path.with_name(lock_path.name + ".pid")
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            pid = owner.read_text(encoding="utf-8").strip()
        except OSError:
            pid = "unknown"
        raise ValueError(
            f"{what} is being written by another bh-routing process (pid {pid}); wait for it to finish, "
            f"or pass another {flag}."
        ) from None
    try:
        owner.write_text(str(os.getpid()), encoding="utf-8")
        yield
    finally:
        lock.release()
