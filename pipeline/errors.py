"""Errors a user can fix, and the one place that turns them into one line on stderr.

Every module raises a subclass of ``PipelineError`` whose ``str()`` is one line naming the file or setting at
fault. The command-line entry points (``python -m pipeline <command>``, ``run_pretrain.py``) run through
``run_cli``: a ``PipelineError`` or an ``OSError`` (disk full, read-only, permission) becomes ``error: ...`` on
stderr and exit status 1, without a traceback. ``PIPELINE_TRACEBACK=1`` shows the traceback for debugging.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

TRACEBACK_ENV = "PIPELINE_TRACEBACK"


class PipelineError(Exception):
    """Base of every user-fixable error of the pipeline; ``str(error)`` is one line."""


class DataError(PipelineError):
    """A problem with user-provided data; ``str(error)`` is one line naming the file."""


class ConfigError(PipelineError):
    """An invalid or inconsistent setting; ``str()`` is one line."""


_ERRNO_WORDS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EDQUOT: "disk quota exceeded", errno.ENOENT: "no such file or directory",
                errno.EIO: "input/output error", errno.ENOTDIR: "not a directory",
                errno.EISDIR: "is a directory"}


def describe_os_error(error: OSError) -> str:
    """``PATH: cause`` for an OSError, in one line (the path it names, or the message alone)."""
    cause = _ERRNO_WORDS.get(error.errno) or (error.strerror or str(error)).strip().lower()
    path = error.filename
    if path is not None and error.filename2 is not None:
        return f"{os.fspath(path)} -> {os.fspath(error.filename2)}: {cause}"
    if path is not None:
        return f"{os.fspath(path)}: {cause}"
    return cause


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line (first line of a multi-line library message)."""
    if isinstance(error, OSError) and not isinstance(error, PipelineError):
        return describe_os_error(error)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_cli(main: Callable[[], int | None]) -> int:
    """Runs a command's ``main`` and returns its exit status; user-fixable errors print one line and give 1."""
    try:
        return int(main() or 0)
    except (PipelineError, OSError) as error:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return 1


def exit_on_data_error(main: Callable[[], int | None]) -> None:
    """``sys.exit(run_cli(main))``: the ``if __name__ == "__main__"`` of each command module."""
    sys.exit(run_cli(main))
