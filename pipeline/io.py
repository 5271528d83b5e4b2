"""Atomic writes and hashing, shared by every module that writes or fingerprints files.

A reader sees the old file or the new one, never a prefix: write a temporary file next to the target (a hidden
name ending in ``.tmp-PID``), flush and fsync it, then ``os.replace`` it onto the target.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

TMP_INFIX = ".tmp-"


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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
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
