"""``python -m bh_helpers``: the ``bh-routing`` command line, as the console script runs it (a Ctrl-C
during the seconds of imports is answered in one line, see :mod:`bh_helpers.app.console`)."""

import sys

from bh_helpers.app.console import main

if __name__ == "__main__":
    sys.exit(main())
