"""Atomic writes, atomic publication of multi-file outputs, hashing, and reading the JSON files users hand us,
shared by every module that writes, fingerprints or reads such files.

One file: a reader sees the old file or the new one, never a prefix: write a temporary file next to the target (a
hidden name ending in ``.tmp-PID``), flush and fsync it, then ``os.replace`` it onto the target.

Several files (a dataset, an export directory): ``publish_directory``. Everything is written into a staging
directory next to the target (``.NAME.tmp-PID``, made by ``make_staging_dir``), fsynced, and published by ONE
rename: ``rename(2)`` when the target does not exist, ``renameat2(RENAME_EXCHANGE)`` when it does (the old and the
new directory swap in one step, then the old one is deleted). A reader therefore sees the whole old output or the
whole new one, and any failure before that rename leaves the old output untouched. Filesystems without the
exchange (some network filesystems; non-Linux) fall back to two renames: the old output is first renamed to
``.NAME.old-PID``; a crash in the microseconds between them leaves no output at NAME but nothing is lost, and
``sweep_leftovers`` (run before every write of NAME) renames it back. Names that must stay files (a dataset's
``PREFIX_train.bin``, ...) are relative symlinks into the published directory, created with ``link_atomic``; they
never change once made, so the one rename switches all of them at once. ``sweep_leftovers`` also removes the
staging directories and temporary files of processes that are no longer running (a ``kill -9``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import DataError

TMP_INFIX = ".tmp-"
OLD_INFIX = ".old-"


def temporary_path(path: str | os.PathLike) -> Path:
    """The hidden temporary name next to ``path`` that this process writes before renaming onto it."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes a rename inside ``path`` durable (best effort: not every filesystem supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming_path(path: str | os.PathLike):
    """Gives an OSError raised without a file name (a failed ``write``: disk full) the ``path`` being written, so
    that ``pipeline.errors.describe_os_error`` prints one line naming it."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), os.fspath(path)) from error
        raise


def make_parents(directory: str | os.PathLike) -> list[Path]:
    """``mkdir -p directory``; returns the directories it created, deepest last, so that a failed write can remove
    them again (``remove_created``) instead of leaving an empty output directory."""
    directory = Path(directory)
    missing = []
    while not directory.exists() and directory.parent != directory:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with naming_path(path):
            path.mkdir(exist_ok=True)
    return list(reversed(missing))


def remove_created(directories: list[Path]) -> None:
    """Removes the (empty) directories ``make_parents`` created, deepest first; never raises (a cleanup must not
    hide the error that caused it)."""
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            pass


def library_os_error(error: Exception, path: str | os.PathLike) -> OSError | None:
    """The OSError behind a Rust library's I/O failure (safetensors, tokenizers say "... (os error 28)"), naming
    ``path``; None if ``error`` is not one."""
    match = re.search(r"os error (\d+)", str(error))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code), os.fspath(path))


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0o644 for umask 022)."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with naming_path(path), open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON (indented, sorted keys) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in ``path``; DataError naming the file and ``what`` it should be when it is missing, not
    UTF-8 JSON, or not an object (an OSError reading it is the caller's to report, as everywhere)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as stream:
            value = json.load(stream)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a valid {what} ({error})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: not a valid {what} (expected a JSON object, got {type(value).__name__})")
    return value


def canonical_json_sha256(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces): a fingerprint of a config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Publishing a directory in one rename


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (the writer of a ``.tmp-PID`` leftover)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    """Removes a file, symlink or directory tree (missing is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def sweep_leftovers(target: str | os.PathLike) -> list[Path]:
    """Cleans up after writers of ``target`` that died (``kill -9``, power loss): removes their ``.NAME.tmp-PID``
    files and staging directories, and restores an ``.NAME.old-PID`` whose publication was cut between its two
    renames (else removes it). Leftovers of a live process (a concurrent writer on this machine) are kept.
    Returns what was removed."""
    target = Path(target)
    directory = target.parent
    if not directory.is_dir():
        return []
    pattern = re.compile(re.escape(f".{target.name}") + "(" + re.escape(TMP_INFIX) + "|" + re.escape(OLD_INFIX)
                         + r")(\d+)$")
    removed = []
    for entry in sorted(directory.iterdir()):
        match = pattern.match(entry.name)
        if match is None or process_running(int(match.group(2))):
            continue
        if match.group(1) == OLD_INFIX and not os.path.lexists(target):
            os.rename(entry, target)  # the old output, left aside by a cut fallback publication: put it back
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def make_staging_dir(target: str | os.PathLike) -> Path:
    """A fresh, empty ``.NAME.tmp-PID`` directory next to ``target`` (created with the default mode, so the
    umask decides who can read the published output), after sweeping dead writers' leftovers."""
    target = Path(target)
    sweep_leftovers(target)
    staging = temporary_path(target)
    if os.path.lexists(staging):
        _remove(staging)
    os.mkdir(staging)
    return staging


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsyncs every file and directory under ``directory`` (the data must be on disk before the rename that
    publishes it, else a power loss could publish empty files)."""
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swaps two paths with Linux's renameat2(RENAME_EXCHANGE) (not in Python's os module); False
    where the system or the filesystem cannot do it, OSError for a real failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def publish_directory(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Makes the complete ``staging`` directory appear at ``target`` in one rename (see the module docstring);
    an existing ``target`` (directory or file) is replaced and deleted afterwards."""
    staging, target = Path(staging), Path(target)
    fsync_tree(staging)
    if not os.path.lexists(target):
        os.rename(staging, target)
    elif _exchange(staging, target):
        _remove(staging)  # now the old output
    else:
        old = target.with_name(f".{target.name}{OLD_INFIX}{os.getpid()}")
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        _remove(old)
    fsync_dir(target.parent)


def link_atomic(link: str | os.PathLike, points_to: str) -> None:
    """Makes ``link`` a symlink to ``points_to`` (relative to the link's directory), replacing whatever is there
    in one rename; nothing if it already is that link."""
    link = Path(link)
    if link.is_symlink() and os.readlink(link) == points_to:
        return
    temporary = temporary_path(link)
    temporary.unlink(missing_ok=True)
    os.symlink(points_to, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
