"""One writer per output: an exclusive lock file held while a command writes a folder or a file.

Without it two processes appending to one results file duplicated rows, two demos starting on
one fresh folder left it holding two grids (every later rerun refused), and two ``fit`` (or
``capture``) runs into one output both exited 0 with one result overwritten. The lock is a
``filelock.FileLock`` (an OS lock: released by the OS when its process dies, so a killed run never
wedges the next one); the holder's pid is written beside it so that the refused process can say
who holds it. Every writer takes it through :func:`exclusive` (a results file, a folder) or
:func:`new_output` (an output that must not exist yet), and checks again under it whether it
would overwrite something: a check made before the lock can be overtaken by another process.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["check_kind", "exclusive", "lock_path", "new_output", "refuse_existing"]

_HELD = threading.local()  # lock files this thread holds: a writer called inside another (the demo's fit) re-enters


def lock_path(target: str | os.PathLike, *, folder: bool = False) -> Path:
    """The lock file of ``target``: ``<folder>/.lock`` for a folder, a hidden ``.<file>.lock`` beside a file.

    Hidden, because it stays (an OS lock file is not removed on release: removing it would let two
    processes lock two different files of one name) and the user's folder should show their outputs.
    """
    target = Path(target)
    return target / ".lock" if folder else target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, *, what: str, flag: str) -> Iterator[None]:
    """Hold ``lock_path`` for the block, or raise ValueError at once when another process holds it.

    Re-entrant within one thread (a writer called by another writer of the same target holds it
    already); another thread or process is refused.

    Parameters
    ----------
    lock_path : path-like
        The lock file (its folder is created).
    what : str
        What is being written, for the message (e.g. ``"output folder 'run'"``).
    flag : str
        The option that chooses another target (e.g. ``"--out"``).
    """
    lock_path = Path(lock_path)
    key = os.path.abspath(lock_path)
    held = _HELD.__dict__.setdefault("paths", set())
    if key in held:
        yield
        return
    owner = lock_path.with_name(lock_path.name + ".pid")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
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
    held.add(key)
    try:
        owner.write_text(str(os.getpid()), encoding="utf-8")
        yield
    finally:
        held.discard(key)
        lock.release()


def check_kind(path: str | os.PathLike, name: str, *, folder: bool = False) -> None:
    """Raise ValueError (naming ``name``) when an output ``path`` is a file where a folder is wanted, or the reverse."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a file; pass a folder.")
    if not folder and path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder; pass a file name.")


def refuse_existing(path: str | os.PathLike, name: str, *, folder: bool = False,
                    exists: Callable[[Path], bool] | None = None, holds: str = "exists") -> None:
    """Raise ValueError (naming ``name``, e.g. ```out_path```) when writing ``path`` would overwrite something.

    A file where a folder is wanted (``folder``) or a folder where a file is, or ``exists(path)``
    (default: the path exists), worded by ``holds`` (e.g. ``"already holds a null bank"``). The one
    "would I overwrite something" check: before the work starts (fail fast, nothing created) and
    again under the lock (:func:`new_output`).
    """
    path = Path(path)
    check_kind(path, name, folder=folder)
    if (exists or Path.exists)(path):
        raise ValueError(f"{name} {str(path)!r} {holds}; pass a new name (nothing is overwritten).")


@contextlib.contextmanager
def new_output(path: str | os.PathLike, name: str, *, folder: bool = False,
               exists: Callable[[Path], bool] | None = None, holds: str = "exists") -> Iterator[Path]:
    """Hold the lock of a new output ``path`` and refuse, under it, when it already holds a result.

    For a file the lock is ``.<file>.lock`` beside it (its folder is created); for a folder
    (``folder=True``) ``<folder>/.lock`` (the folder is created). ``name`` is the argument that
    chooses the output (```out_path```; the command line shows its flag). See :func:`refuse_existing`.
    """
    path = Path(path)
    check = {"folder": folder, "exists": exists, "holds": holds}
    refuse_existing(path, name, **check)  # before creating anything
    kind = "output folder" if folder else "output file"
    created = folder and not path.exists()
    try:
        with exclusive(lock_path(path, folder=folder), what=f"{kind} {str(path)!r}", flag=name):
            refuse_existing(path, name, **check)  # again: another process may have written it meanwhile
            yield path
    except BaseException:
        if created:  # a failed fit leaves no empty folder behind (only one it made, holding only its lock)
            _remove_if_only_the_lock(path)
        raise


def _remove_if_only_the_lock(folder: Path) -> None:
    lock = lock_path(folder, folder=True)
    leftovers = {lock.name, lock.name + ".pid"}
    try:
        if {p.name for p in folder.iterdir()} <= leftovers:
            for name in leftovers:
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:  # another process got in meanwhile, or the folder is read-only: leave it as it is
        pass
