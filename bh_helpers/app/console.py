"""The ``bh-routing`` console script: the CLI, with Ctrl-C answered in one line from the first moment
(:func:`bh_helpers.app.cli.main` handles it once loaded; torch's seconds of import came before)."""

import sys


def main() -> int:
    """Entry point of ``bh-routing``; returns the exit status (130 after Ctrl-C)."""
    try:
        from bh_helpers.app.cli import main as run  # imports torch and transformers: seconds

        return run()
    except KeyboardInterrupt:  # every step writes whole files: what finished is kept and resumed
        print("bh-routing: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
