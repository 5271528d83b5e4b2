"""Errors of the data path that a user can fix: bad input files, mismatched tokenizer, damaged datasets.

Library functions raise ``DataError`` with a one-line message that names the offending file; the command-line
entry points print it as ``error: <message>`` on stderr and exit with status 1, without a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class DataError(Exception):
    """A problem with user-provided data; ``str(error)`` is one line naming the file."""


def exit_on_data_error(main: Callable[[], int | None]) -> NoReturn:
    """Runs a CLI ``main`` and turns a ``DataError`` into ``error: ...`` on stderr and exit status 1."""
    try:
        status = main()
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.exit(status or 0)
